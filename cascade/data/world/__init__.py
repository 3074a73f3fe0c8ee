"""The synthetic world: the embedded default data of cascade, with a known ground truth.

The world is built on the real KuaiRand-Pure side tables shipped in the project's ``data/`` folder
(``user_features_pure.csv``, ``video_features_basic_pure.csv``) and simulates ``n_days`` of a short-video feed
hour by hour. It writes its logs in the official KuaiRand layout, so one loader reads the world and a real
KuaiRand download, and it keeps every parameter of its click model, so :meth:`World.true_click_prob` and
:meth:`World.oracle_topk` give the ground truth that no logged data set can give.

Click model (all terms on the logit scale; ``u`` a user, ``i`` an item, ``h`` the hour of day, ``t`` the tab)::

    appeal(u, i, h, t) = base + <U_u, V_i> + w_pop * pop_i + w_q * quality_i + bias_u          (static)
                       + C_hour_group[h // 4, group_i] + C_tab_group[t, group_i]
                         + C_hour_vtype[h // 4, vtype_i]                                         (context x item)
                       + b_tag * log1p(tag_click[u, tag_i]) + b_author * log1p(author_click[u, bucket_i])
                         - f * (log1p(tag_skip[u, tag_i]) + log1p(author_skip[u, bucket_i]))    (history x item)
    P(click at position p) = exam(p) * sigmoid(appeal),   exam(p) = (1 + p) ** -position_bias

- ``U_u`` is a sum of embeddings of the user's real features (``user_active_degree``, ``register_days_range``,
  ``is_live_streamer``, ``is_video_author``, ``onehot_feat0..17``) plus noise; ``V_i`` a sum of embeddings of the
  item's first ``tag``, ``author_id``, ``music_type``, ``video_type`` and ``upload_type`` plus noise. Each is scaled
  so that ``<U_u, V_i>`` over random pairs has standard deviation ``affinity_scale``.
- ``pop_i`` is a heavy-tailed popularity (``exp(pop_i)`` is log-normal), correlated with tag, author and upload
  type; the logging policy samples candidates in proportion to ``exp(pop_i)``. ``quality_i`` is a hidden item
  quality that drives satisfaction more than appeal.
- The history terms are what an inner product of a user tower and an item tower cannot represent: decayed
  (half-life ``history_half_life_hours``), satisfaction-weighted clicks of the user on the item's tag and author
  raise the appeal with saturation (``log1p``); exposures without a click lower it (fatigue). Tags are held in a
  dense ``[n_users, n_tags]`` array (about 45 tags); authors in a hashed ``[n_users, author_buckets]`` table
  (each author maps to one bucket; colliding authors share state, and the ground truth is defined on the
  buckets, so it stays exactly consistent with the simulation).
- Post-click: a satisfaction logit ``sat = w_sat * <U_u, V_i> + quality_i + sat_bias_u + noise`` (correlated with
  but not equal to the appeal) drives ``play_time_ms`` (a fraction ``sigmoid(sat + noise)`` of the duration),
  ``long_view`` (fraction >= 0.5), likes, follows, comments, forwards, hates and profile visits. A click adds
  ``0.5 + sigmoid(sat)`` to the history state, so watch time is informative about the user's later clicks: it
  is a privileged signal in the sense of PFD.

Logging policy: each request draws ``candidates_per_request`` candidates (a ``popular_candidate_fraction`` share
in proportion to ``exp(pop_i)``, the rest uniform over the corpus: no users x items matrix is ever built), scores
them with the true appeal plus ``policy_noise`` Gaussian noise plus ``policy_popularity_weight * pop_i`` (a noisy,
popularity-biased production ranker), and shows the top ``request_size`` in score order. A ``random_fraction`` of
requests is random exposure (``is_rand = 1``): ``request_size`` distinct items drawn uniformly over the corpus and
shown in random order.

Time runs in hour steps; within a step all requests are simulated at once and read the history state from before
the step; the state is updated after the step. A request is keyed by ``(user, date, hour, tab, is_rand)`` and there
is at most one per key; its impressions get strictly increasing ``time_ms`` (2-15 s apart) in position order,
within the hour, and share ``date``, ``hourmin`` (``hour * 100``), ``tab`` and ``is_rand``. Times are epoch
milliseconds with ``date``/``hourmin`` in Beijing time (UTC+8), as in KuaiRand.

Modules: ``config`` (WorldConfig, constants), ``tables`` (the real side tables), ``model`` (latent arrays, history
state, :class:`World`: the ground truth), ``simulate`` (requests, hour steps, post-click), ``generate``
(:func:`generate_world`), ``chunked`` (:func:`generate_world_stream`: the same model written in chunks).

Output (``generate_world``): ``user_features_pure.csv``, ``video_features_basic_pure.csv`` (the real columns),
``log_standard_<m>_<dd>_to_<m>_<dd>_pure.csv`` split in two at about 2/3 of the period,
``log_random_<m>_<dd>_to_<m>_<dd>_pure.csv``, ``world.json`` (config + summary) and ``world_state.npz`` (every
array the ground truth needs; plain arrays, no pickle). :meth:`World.load` restores the ground truth from them.
"""

from .chunked import StreamWorldResult, generate_world_stream, world_stream_files
from .config import (
    BEIJING,
    HOUR_MS,
    KUAIRAND_LOG_COLUMNS,
    USER_FEATURES_FILE,
    VIDEO_FEATURES_FILE,
    WORLD_JSON,
    WORLD_STATE,
    HistoryState,
    WorldConfig,
    embedded_data_dir,
)
from .generate import generate_world
from .model import World

__all__ = ["BEIJING", "HOUR_MS", "KUAIRAND_LOG_COLUMNS", "USER_FEATURES_FILE", "VIDEO_FEATURES_FILE", "WORLD_JSON",
           "WORLD_STATE", "HistoryState", "StreamWorldResult", "World", "WorldConfig", "embedded_data_dir",
           "generate_world", "generate_world_stream", "world_stream_files"]
