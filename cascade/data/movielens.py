"""MovieLens-100K and MovieLens-1M -> canonical tables.

MovieLens has ratings, not exposures. The mapping used here:

- a request is a user-day: all the movies one user rated on one UTC day (``timestamp // 86400``);
- ``position`` is the 0-based order by (timestamp, item_id) within the request;
- ``request_id`` is dense, 0..R-1 in time order of each request's first rating;
- ``click = rating >= 4``; ``is_rand = 0``; ``time_ms = timestamp * 1000``;
- context: ``hour`` and ``weekday`` of the rating time in UTC (the files carry no time zone).

The rating is the label source only: the impressions keep a ``rating`` column for graded evaluation, but no
schema feature is derived from it.

Items: ``item_id``, ``genre`` (the first listed genre, categorical), one 0/1 numeric column per genre
(``genre_action``, ..., multi-hot) and ``release_year`` (numeric; missing -> median + ``release_year_missing``).
Users: ``user_id``, ``age_bucket`` (the ML-1M age codes 1, 18, 25, 35, 45, 50, 56; categorical), ``gender``,
``occupation``, ``zip_prefix`` (first character of the zip code), all categorical; ML-100K adds the numeric ``age``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .io import (
    assign_requests,
    check_time_unit,
    data_line,
    fill_missing_numeric,
    group_ids,
    hour_weekday,
    py_scalar,
    read_csv_strict,
    sort_impressions,
)
from .schema import Dataset, DataValidationError, Feature, Schema

log = logging.getLogger(__name__)

#: Genres in the order of ML-100K's u.genre (ML-1M uses the same names without "unknown").
GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
#: ML-1M age codes; the lower edge of each bucket ("1" = under 18).
AGE_BUCKETS: tuple[int, ...] = (1, 18, 25, 35, 45, 50, 56)
CLICK_MIN_RATING = 4


def genre_column(genre: str) -> str:
    """Column name of a genre flag: "Children's" -> "genre_childrens", "Sci-Fi" -> "genre_sci_fi"."""
    return "genre_" + re.sub(r"[^a-z0-9]+", "_", genre.lower().replace("'", "")).strip("_")


def age_bucket(age: np.ndarray) -> np.ndarray:
    """ML-1M age code [N] of ages [N]: <18 -> 1, 18-24 -> 18, 25-34 -> 25, ..., 50-55 -> 50, 56+ -> 56."""
    edges = np.asarray(AGE_BUCKETS[1:])
    return np.asarray(AGE_BUCKETS, dtype=np.int64)[np.searchsorted(edges, np.asarray(age), side="right")]


def _ratings_to_impressions(ratings: pd.DataFrame, source: str) -> pd.DataFrame:
    """ratings (user_id, item_id, rating, timestamp in seconds) -> canonical impressions (see module docstring)."""
    ts = ratings["timestamp"].to_numpy(np.int64)
    check_time_unit(ts, "s", source, "timestamp", line_of=lambda row: data_line(source, row, header=False))
    r = ratings["rating"].to_numpy()
    bad = (r < 1) | (r > 5)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        line = data_line(source, row, header=False)
        raise DataValidationError(
            f"{source}: column 'rating' must be in 1..5, line {line} holds {py_scalar(r[row])!r}"
        )
    pair = ratings[["user_id", "item_id"]]
    again = pair.duplicated(keep=False).to_numpy()
    if again.any():
        rows = np.flatnonzero(again)
        first = rows[(pair.iloc[rows] == pair.iloc[rows[0]]).all(axis=1).to_numpy()][:2]
        line1 = data_line(source, first[0], header=False)
        line2 = data_line(source, first[1], header=False)
        raise DataValidationError(
            f"{source}: user {py_scalar(pair.iloc[first[0], 0])} rated movie {py_scalar(pair.iloc[first[0], 1])} "
            f"twice (lines {line1} and {line2}; {int(pair.duplicated().sum()):,} repeated pair(s) in "
            "all): a MovieLens ratings file holds one rating per user and movie")
    imp = pd.DataFrame({"user_id": ratings["user_id"].to_numpy(np.int64),
                        "item_id": ratings["item_id"].to_numpy(np.int64)})
    imp["time_ms"] = ts * 1000
    imp["day"] = ts // 86_400
    group = group_ids(imp, ["user_id", "day"])
    imp["request_id"], imp["position"] = assign_requests(group, imp["time_ms"].to_numpy(), imp["item_id"].to_numpy())
    imp["click"] = (r >= CLICK_MIN_RATING).astype(np.int64)
    imp["is_rand"] = np.zeros(len(imp), dtype=np.int64)
    imp["hour"], imp["weekday"] = hour_weekday(imp["time_ms"].to_numpy(), 0.0)
    imp["rating"] = r.astype(np.int64)
    cols = ["request_id", "user_id", "item_id", "time_ms", "position", "click", "is_rand", "hour", "weekday", "rating"]
    return sort_impressions(imp[cols])


def _genre_flags(items: pd.DataFrame, flags: np.ndarray, genres: tuple[str, ...]) -> list[str]:
    """In place: multi-hot genre columns and ``genre`` (first genre, "none" if a movie has none). Returns names."""
    names = [genre_column(g) for g in genres]
    for j, name in enumerate(names):
        items[name] = flags[:, j].astype(np.float64)
    has = flags.any(axis=1)
    first = np.asarray(genres, dtype=object)[flags.argmax(axis=1)]
    items["genre"] = np.where(has, first, "none").astype(str)
    return names


def _schema(item_numeric: list[str], item_flags: list[str], user_cat: list[str], user_num: list[str]) -> Schema:
    feats = [Feature("user_id", "users", "categorical", "user")]
    feats += [Feature(c, "users", "categorical", "user") for c in user_cat]
    feats += [Feature(c, "users", "numeric", "user") for c in user_num]
    feats += [Feature("item_id", "items", "categorical", "item"), Feature("genre", "items", "categorical", "item")]
    feats += [Feature(c, "items", "numeric", "item") for c in item_numeric]
    feats += [Feature(c, "items", "categorical", "item") for c in item_flags]
    feats += [Feature("hour", "impressions", "categorical", "context"),
              Feature("weekday", "impressions", "categorical", "context")]
    return Schema(tuple(feats))


def _release_year(items: pd.DataFrame, years: pd.Series, source: str) -> list[str]:
    """In place: numeric ``release_year``; returns the missing-value flag column(s) added (0 or 1 name)."""
    items["release_year"] = pd.to_numeric(years, errors="coerce").to_numpy(np.float64)
    return fill_missing_numeric(items, ["release_year"], source)


def load_movielens_100k(directory: str | Path) -> Dataset:
    """Load MovieLens-100K (u.data, u.user, u.item) into a validated :class:`Dataset` named "ml-100k".

    u.data: tab-separated ``user item rating unix_s``; u.user: ``id|age|gender|occupation|zip``; u.item (latin-1):
    ``id|title|release date|video release date|url|`` + 19 genre flags in the order of :data:`GENRES`.
    """
    d = Path(directory)
    data_p, user_p, item_p = d / "u.data", d / "u.user", d / "u.item"
    ratings = read_csv_strict(data_p, ("user_id", "item_id", "rating", "timestamp"),
                              {"user_id": "int64", "item_id": "int64", "rating": "int64", "timestamp": "int64"},
                              sep="\t", names=("user_id", "item_id", "rating", "timestamp"),
                              nonnegative=("user_id", "item_id"))
    users = read_csv_strict(user_p, ("user_id", "age", "gender", "occupation", "zip"),
                            {"user_id": "int64", "age": "int64", "gender": "str", "occupation": "str", "zip": "str"},
                            sep="|", names=("user_id", "age", "gender", "occupation", "zip"), quoting=False,
                            nonnegative=("user_id", "age"), unique=("user_id",))
    flag_names = [f"flag{j}" for j in range(len(GENRES))]
    item_names = ("item_id", "title", "release_date", "video_release_date", "url", *flag_names)
    items = read_csv_strict(item_p, item_names,
                            {"item_id": "int64", "title": "str", "release_date": "str", "video_release_date": "str",
                             "url": "str", **{f: "int64" for f in flag_names}},
                            sep="|", names=item_names, encoding="latin-1", quoting=False,
                            nullable=("title", "release_date", "video_release_date", "url"),
                            nonnegative=("item_id",), unique=("item_id",))
    flags = items[flag_names].to_numpy()
    if not np.isin(flags, (0, 1)).all():
        row, col = map(int, np.argwhere(~np.isin(flags, (0, 1)))[0])
        line = data_line(item_p, row, header=False)
        raise DataValidationError(
            f"{item_p}: genre flag {GENRES[col]!r} must be 0/1, line {line} holds {py_scalar(flags[row, col])!r}"
        )
    out_items = items[["item_id", "title"]].copy()
    genre_cols = _genre_flags(out_items, flags.astype(bool), GENRES)
    # "01-Jan-1995": the year is the last four characters.
    year_flags = _release_year(out_items, items["release_date"].str[-4:], str(item_p))

    out_users = users[["user_id"]].copy()
    out_users["age"] = users["age"].to_numpy(np.float64)
    out_users["age_bucket"] = age_bucket(users["age"].to_numpy())
    out_users["gender"] = users["gender"].astype(str)
    out_users["occupation"] = users["occupation"].astype(str)
    out_users["zip_prefix"] = users["zip"].str.strip().str[:1].astype(str)

    imp = _ratings_to_impressions(ratings, str(data_p))
    schema = _schema(genre_cols + ["release_year"], year_flags, ["age_bucket", "gender", "occupation", "zip_prefix"],
                     ["age"])
    ds = Dataset(out_users, out_items, imp, schema, name="ml-100k",
                 sources={"users": str(user_p), "items": str(item_p), "impressions": str(data_p)})
    return ds.validate()


def load_movielens_1m(directory: str | Path) -> Dataset:
    """Load MovieLens-1M (ratings.dat, users.dat, movies.dat; ``::``-separated, latin-1) into a Dataset "ml-1m".

    ratings.dat: ``UserID::MovieID::Rating::Timestamp``; users.dat: ``UserID::Gender::Age::Occupation::Zip-code``
    (Age is already the bucket code); movies.dat: ``MovieID::Title (Year)::Genre1|Genre2``.
    """
    d = Path(directory)
    data_p, user_p, item_p = d / "ratings.dat", d / "users.dat", d / "movies.dat"
    ratings = read_csv_strict(data_p, ("user_id", "item_id", "rating", "timestamp"),
                              {"user_id": "int64", "item_id": "int64", "rating": "int64", "timestamp": "int64"},
                              sep="::", names=("user_id", "item_id", "rating", "timestamp"), encoding="latin-1",
                              quoting=False, nonnegative=("user_id", "item_id"))
    users = read_csv_strict(user_p, ("user_id", "gender", "age", "occupation", "zip"),
                            {"user_id": "int64", "gender": "str", "age": "int64", "occupation": "int64", "zip": "str"},
                            sep="::", names=("user_id", "gender", "age", "occupation", "zip"), encoding="latin-1",
                            quoting=False, nonnegative=("user_id", "age", "occupation"), unique=("user_id",))
    movies = read_csv_strict(item_p, ("item_id", "title", "genres"),
                             {"item_id": "int64", "title": "str", "genres": "str"},
                             sep="::", names=("item_id", "title", "genres"), encoding="latin-1", quoting=False,
                             nullable=("genres",), nonnegative=("item_id",), unique=("item_id",))
    bad_age = ~np.isin(users["age"].to_numpy(), AGE_BUCKETS)
    if bad_age.any():
        row = int(np.flatnonzero(bad_age)[0])
        line = data_line(user_p, row, header=False)
        raise DataValidationError(
            f"{user_p}: column 'age' must be one of the ML-1M codes {AGE_BUCKETS}, line {line} holds "
            f"{int(users['age'].iloc[row])}"
        )
    genres = GENRES[1:]
    lists = movies["genres"].fillna("").str.split("|")
    # Multi-hot flags in one vectorised pass: explode the lists, then scatter.
    exploded = lists.explode()
    known = {g: j for j, g in enumerate(genres)}
    codes = exploded.map(known)
    unknown = exploded.notna() & (exploded != "") & codes.isna()
    if unknown.any():
        pos = int(np.flatnonzero(unknown.to_numpy())[0])
        row = int(exploded.index[pos])
        line = data_line(item_p, row, header=False)
        raise DataValidationError(
            f"{item_p}: column 'genres' holds unknown genre {py_scalar(exploded.iloc[pos])!r} at line {line} "
            f"(known: {list(genres)})"
        )
    flags = np.zeros((len(movies), len(genres)), dtype=bool)
    ok = codes.notna().to_numpy()
    flags[exploded.index.to_numpy()[ok], codes.to_numpy()[ok].astype(np.int64)] = True
    out_items = movies[["item_id", "title"]].copy()
    out_items["genre"] = lists.str[0].replace("", "none").fillna("none").astype(str)
    genre_cols = _genre_flags_keep_first(out_items, flags, genres)
    year_flags = _release_year(out_items, movies["title"].str.extract(r"\((\d{4})\)\s*$")[0], str(item_p))

    out_users = users[["user_id"]].copy()
    out_users["age_bucket"] = users["age"].to_numpy(np.int64)
    out_users["gender"] = users["gender"].astype(str)
    out_users["occupation"] = users["occupation"].to_numpy(np.int64)
    out_users["zip_prefix"] = users["zip"].str.strip().str[:1].astype(str)

    imp = _ratings_to_impressions(ratings, str(data_p))
    schema = _schema(genre_cols + ["release_year"], year_flags, ["age_bucket", "gender", "occupation", "zip_prefix"],
                     [])
    ds = Dataset(out_users, out_items, imp, schema, name="ml-1m",
                 sources={"users": str(user_p), "items": str(item_p), "impressions": str(data_p)})
    return ds.validate()


def _genre_flags_keep_first(items: pd.DataFrame, flags: np.ndarray, genres: tuple[str, ...]) -> list[str]:
    """Multi-hot columns only: ML-1M's first genre is the first one *listed*, already set by the caller."""
    first = items["genre"].copy()
    names = _genre_flags(items, flags, genres)
    items["genre"] = first
    return names
