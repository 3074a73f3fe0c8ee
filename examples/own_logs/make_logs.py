"""Write the example of your own logs: users.csv, items.csv and impressions.csv of a small made-up shop.

Seeded and self-contained (no dataset is copied): 400 customers, 600 products, 20 days of sessions in which each
shown product is clicked with a probability that depends on the customer's taste for its category, its price,
the hour and its slot. Ids are text ("c0007", "sku-00042") as in most shop logs; the columns position, is_rand
and hour carry the canonical names, so the loader picks them up without a mapping entry. ``mapping.toml`` beside
this script maps the files onto cascade's tables. Re-run it to rewrite the CSVs (byte-identical):

    python examples/own_logs/make_logs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

N_USERS, N_ITEMS, N_DAYS, N_SESSIONS = 400, 600, 20, 1200
CATEGORIES = ("shoes", "hats", "bags", "coats", "socks", "belts", "gloves", "scarves")
COUNTRIES = ("de", "fr", "nl", "it", "es")
START_S = 1_704_067_200  # 2024-01-01 00:00 UTC


def make_logs(seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(users, items, impressions) frames as the CSVs hold them."""
    rng = np.random.default_rng(seed)
    users = pd.DataFrame({"customer": [f"c{u:04d}" for u in range(N_USERS)],
                          "country": rng.choice(COUNTRIES, N_USERS),
                          "age": rng.integers(18, 75, N_USERS)})
    cat = rng.integers(0, len(CATEGORIES), N_ITEMS)
    items = pd.DataFrame({"sku": [f"sku-{i:05d}" for i in range(N_ITEMS)],
                          "category": np.asarray(CATEGORIES)[cat],
                          "brand": [f"brand-{b:02d}" for b in rng.integers(0, 40, N_ITEMS)],
                          "price": np.round(rng.lognormal(3.3, 0.6, N_ITEMS), 2)})
    taste = rng.normal(0.0, 1.2, (N_USERS, len(CATEGORIES)))
    popularity = rng.normal(0.0, 0.7, N_ITEMS)
    rows = []
    for s in range(N_SESSIONS):
        u = int(rng.integers(N_USERS))
        t = START_S + int(rng.integers(N_DAYS * 86_400))
        hour = (t // 3600) % 24
        random_slot = rng.random() < 0.05  # a few sessions show random products (is_rand = 1)
        n_shown = int(rng.integers(3, 8))
        if random_slot:
            shown = rng.choice(N_ITEMS, n_shown, replace=False)
        else:  # the shop's policy shows what the customer tends to like, noisily
            score = taste[u, cat] + popularity + rng.normal(0.0, 1.5, N_ITEMS)
            shown = np.argsort(-score)[:n_shown]
        for pos, i in enumerate(shown):
            evening = 0.4 if 18 <= hour <= 22 else 0.0
            logit = (-1.6 + 0.9 * taste[u, cat[i]] + 0.5 * popularity[i] - 0.3 * np.log(items.price[i] / 27.0)
                     + evening - 0.25 * pos)
            rows.append({"session": f"s{s:05d}", "customer": users.customer[u], "sku": items.sku[i],
                         "ts": t + 7 * pos, "position": pos, "is_rand": int(random_slot), "hour": int(hour),
                         "clicked": int(rng.random() < 1.0 / (1.0 + np.exp(-logit)))})
    imp = pd.DataFrame(rows).sort_values(["ts", "position"], kind="stable").reset_index(drop=True)
    return users, items, imp


def write(folder: Path) -> None:
    users, items, imp = make_logs()
    for name, df in (("users", users), ("items", items), ("impressions", imp)):
        df.to_csv(folder / f"{name}.csv", index=False, lineterminator="\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
