"""Suite-wide test settings.

Hypothesis runs derandomized by default: its examples follow from the code, so CI and a local run try the same
cases and a red CI run is reproducible. ``CASCADE_HYPOTHESIS=explore python -m pytest -q`` draws fresh random
examples instead (that is how a column whose train values differ by 4e-110 was found to standardise unseen
values to inf); a failure it finds should become an ``@example`` on the test.
"""

import os

from hypothesis import settings

PROFILES = {"deterministic": dict(derandomize=True), "explore": dict(derandomize=False)}
for _name, _kw in PROFILES.items():
    settings.register_profile(_name, **_kw)
_profile = os.environ.get("CASCADE_HYPOTHESIS") or "deterministic"
if _profile not in PROFILES:
    raise ValueError(f"CASCADE_HYPOTHESIS={_profile!r} is not one of {sorted(PROFILES)}")
settings.load_profile(_profile)
