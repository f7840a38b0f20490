#!/usr/bin/env python3
"""MovieLens-100K `u.item` (Latin-1, '|'-separated) → learn-kern items JSON Lines (UTF-8).

Each movie becomes {"id": movie id, "title": title, "category": [genres], "attributes": {"released": date}};
learn-kern builds the text "Title: …\nCategory: …\nAttributes: released: …" from those fields (SPEC §2.3).

Usage: python3 tools/movielens/items.py path/to/ml-100k/u.item > items.jsonl
"""
import json
import sys

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western"]


def main(path):
    with open(path, encoding="latin-1") as f:
        for line in f:
            fields = line.rstrip("\n").split("|")
            if len(fields) < 5 + len(GENRES):
                continue
            flags = fields[5:5 + len(GENRES)]
            genres = [g for g, flag in zip(GENRES, flags) if flag == "1" and g != "unknown"]
            record = {"id": int(fields[0]), "title": fields[1], "category": genres}
            if fields[2]:
                record["attributes"] = {"released": fields[2]}
            print(json.dumps(record, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1])
