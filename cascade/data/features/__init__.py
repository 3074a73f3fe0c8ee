"""Feature encoding, user x item cross features, and encoded tables.

Three pieces, all fitted once and then applied with vectorised numpy only:

- :class:`FeatureEncoder` turns the schema's user / item / context / privileged columns into ``cat`` (int64,
  vocabulary indices, 0 = OOV) and ``num`` (float32) arrays. Everything it learns comes from the TRAIN
  impressions: vocabularies and numeric statistics are fitted on the user and item rows *as the train
  impressions see them* (each user / item row weighted by its number of train exposures), because that is the
  distribution the models train on. Consequently a value (an id, a tag, an author) that only appears in the
  valid / test days or only in the side table maps to OOV index 0, exactly like a cold-start value at serving
  time. Values seen fewer than ``min_count`` times in train also map to 0.
- :class:`CrossFeatureStore` answers user x item interaction statistics for ANY ``(user, item, t)`` from the
  events strictly before ``t`` in a trailing window: the user's clicks / exposures on the item's tag and on
  the item's author, the item's recent exposures and smoothed CTR, the user's recent exposures and smoothed CTR.
- :func:`build_encoded` / :class:`PairEncoder` assemble encoded tables for the impressions of each split and
  feature rows for arbitrary candidate pairs, with one column layout (a :class:`FeatureSpec`).

Modules: ``encoder`` (FeatureEncoder), ``fit`` (the fit rules the in-memory and the streaming fit share),
``columns`` (reading columns), ``cross`` (CrossFeatureStore), ``pairs`` (PairEncoder, build_encoded).

Column order of the assembled arrays: user, item, context, cross, privileged (cat and num alike).
Sequence features are not supported by this encoder (fit raises).
"""

from .columns import NUMERIC_MODES, PARTS, cat_keys, column, float_values, part_of, scale
from .cross import CrossFeatureStore
from .encoder import ENCODER_JSON, ENCODER_NPZ, FeatureEncoder
from .fit import TrainValues, WeightedValues, check_cross_names, encoded_features, fit_categorical, fit_numeric
from .pairs import PairEncoder, build_encoded

__all__ = ["CrossFeatureStore", "ENCODER_JSON", "ENCODER_NPZ", "FeatureEncoder", "NUMERIC_MODES", "PARTS",
           "PairEncoder", "TrainValues", "WeightedValues", "build_encoded", "cat_keys", "check_cross_names", "column",
           "encoded_features", "fit_categorical", "fit_numeric", "float_values", "part_of", "scale"]
