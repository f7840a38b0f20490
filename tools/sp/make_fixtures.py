"""Trains the SentencePiece fixtures of tests/sentencepiece.rs and records what `sentencepiece` itself encodes.

    python3 tools/sp/make_fixtures.py [--out tests/fixtures/sp]

Needs `sentencepiece` and `protobuf` (pip install sentencepiece protobuf). Writes, under --out:
  <name>.model   one SentencePiece BPE model per entry of MODELS below, and unigram.model (to be refused);
  cases.zip      strings.jsonl (one JSON string per line) and ids/<name>.txt (per string, the ids
                 `SentencePieceProcessor.encode` returns, space-separated, one line per string).

The models follow Baichuan2's published trainer settings (BPE, byte fallback, split digits, whitespace-only
pieces, no dummy prefix, no whitespace removal, identity normalisation, user-defined symbols, pieces of at
most 16 characters) on a synthetic corpus (tools/sp/corpus.py), plus variants that reach the other encoder
paths: proto2 defaults for the whitespace flags, whitespace removal with user symbols, <unk> without byte
fallback, whitespace as suffix, unescaped spaces, user symbols containing spaces, and UNUSED pieces.

Score ties: SentencePiece's BPE trainer gives the n-th merged piece the score -n, so trained merges never
tie (only the control, user-defined and byte pieces share 0.0, and they never take part in merges). The
`large-ties` model therefore rewrites the scores of `large` so that consecutive groups of 64 merged pieces
share one score; the encoder then has to break ties exactly as SentencePiece does (leftmost pair first).
"""

import argparse
import io
import json
import os
import random
import sys
import time
import zipfile
from collections import Counter

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus import USER_SYMBOLS, test_strings, training_corpus  # noqa: E402

NORMAL, UNUSED = 1, 5

BAICHUAN2 = dict(
    model_type="bpe",
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_number=True,
    split_by_whitespace=True,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    character_coverage=0.9999,
    user_defined_symbols=USER_SYMBOLS,
)

MODELS = {
    "small": dict(BAICHUAN2, vocab_size=1500),
    "large": dict(BAICHUAN2, vocab_size=16000, hard_vocab_limit=False),
    # proto2 defaults for the whitespace flags (dummy prefix, extra whitespace removed), <unk> without
    # byte fallback, and pieces that span digits.
    "defaults": dict(model_type="bpe", normalization_rule_name="identity", vocab_size=2000, character_coverage=0.9995),
    # Whitespace removal without a dummy prefix, with user-defined symbols (one of them starts with U+2581).
    "strip": dict(model_type="bpe", normalization_rule_name="identity", vocab_size=1500, add_dummy_prefix=False,
                  user_defined_symbols=["<|im_start|>", "<mask>", "\t\t", "▁x"]),
    # Whitespace as a suffix (the dummy prefix becomes a dummy suffix), user symbols with spaces; the
    # post-processing below also turns off whitespace escaping and marks some merged pieces UNUSED.
    "odd": dict(model_type="bpe", normalization_rule_name="identity", vocab_size=1500, treat_whitespace_as_suffix=True,
                byte_fallback=True, split_digits=True, user_defined_symbols=["New York", " x", "<mask>", "ab"]),
}


def train(lines, settings):
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, num_threads=2, minloglevel=2,
                                   **settings)
    proto = pb.ModelProto()
    proto.ParseFromString(out.getvalue())
    return proto


def tie_groups(proto):
    """Number of scores shared by two or more merged (NORMAL, multi-character) pieces."""
    scores = Counter(p.score for p in proto.pieces if p.type == NORMAL and len(p.piece) > 1)
    return sum(1 for n in scores.values() if n > 1)


def with_ties(proto, group):
    tied = pb.ModelProto()
    tied.CopyFrom(proto)
    merged = [p for p in tied.pieces if p.type == NORMAL and len(p.piece) > 1]
    for rank, p in enumerate(merged):
        p.score = -float(rank // group)
    return tied


def make_odd(proto, rng):
    proto.normalizer_spec.escape_whitespaces = False
    merged = [p for p in proto.pieces if p.type == NORMAL and len(p.piece) > 1]
    for p in rng.sample(merged, 60):
        p.type = UNUSED
    return proto


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/sp")
    ap.add_argument("--strings", type=int, default=10000)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    lines = training_corpus(seed=1, n_lines=40000)
    protos = {name: train(lines, settings) for name, settings in MODELS.items()}
    print(f"large: {tie_groups(protos['large'])} tied scores among merged pieces as trained")
    protos["large-ties"] = with_ties(protos["large"], group=64)
    print(f"large-ties: {tie_groups(protos['large-ties'])} tied scores among merged pieces after rewriting")
    protos["odd"] = make_odd(protos["odd"], random.Random(7))

    # A unigram model (identity normalisation keeps the file small), which the encoder must refuse.
    ascii_lines = [line for line in lines[:20000] if line.isascii()]
    unigram = train(ascii_lines, dict(model_type="unigram", normalization_rule_name="identity", vocab_size=300))
    with open(os.path.join(args.out, "unigram.model"), "wb") as f:
        f.write(unigram.SerializeToString())

    strings = test_strings(seed=2, n=args.strings)
    cases = io.BytesIO()
    with zipfile.ZipFile(cases, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        def put(name, text):  # fixed timestamps: the same fixtures give the same bytes
            z.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), text, zipfile.ZIP_DEFLATED, 9)

        put("strings.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in strings))
        for name, proto in protos.items():
            blob = proto.SerializeToString()
            with open(os.path.join(args.out, f"{name}.model"), "wb") as f:
                f.write(blob)
            sp = spm.SentencePieceProcessor(model_proto=blob)
            ids = [sp.encode(s) for s in strings]
            put(f"ids/{name}.txt", "".join(" ".join(map(str, row)) + "\n" for row in ids))
            t = time.perf_counter()
            for s in strings:
                sp.encode(s)
            dt = time.perf_counter() - t
            print(f"{name}: {sp.get_piece_size()} pieces, {sum(map(len, ids))} ids; "
                  f"python sentencepiece {len(strings) / dt:,.0f} strings/s (one thread, one call per string)")
    with open(os.path.join(args.out, "cases.zip"), "wb") as f:
        f.write(cases.getvalue())
    print(f"{len(strings)} strings; cases.zip {len(cases.getvalue()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
