"""Checks exported tokenizer.json files with Python's `tokenizers` against `sentencepiece` itself.

    mkdir -p /tmp/sp-export
    LEARN_KERN_SP_EXPORT_DIR=/tmp/sp-export cargo test --test sentencepiece exported
    python3 tools/sp/check_export.py /tmp/sp-export

For each <name>.json in the directory, loads tests/fixtures/sp/<name>.model with `sentencepiece` and the
JSON with `tokenizers.Tokenizer`, and compares on the 10,000 fixture strings: the ids (must all match) and
the decoded text of those ids (reported: decoding is a convenience of the export, not its contract).
"""

import io
import json
import os
import sys
import zipfile

import sentencepiece as spm
from tokenizers import Tokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "sp")


def main():
    export_dir = sys.argv[1]
    with zipfile.ZipFile(os.path.join(FIXTURES, "cases.zip")) as z:
        strings = [json.loads(line) for line in io.TextIOWrapper(z.open("strings.jsonl"), encoding="utf-8")]
    failed = False
    for file in sorted(os.listdir(export_dir)):
        if not file.endswith(".json"):
            continue
        name = file[: -len(".json")]
        sp = spm.SentencePieceProcessor(model_file=os.path.join(FIXTURES, f"{name}.model"))
        tok = Tokenizer.from_file(os.path.join(export_dir, file))
        bad_ids = bad_text = 0
        for s in strings:
            want = sp.encode(s)
            got = tok.encode(s, add_special_tokens=False).ids
            if got != want:
                bad_ids += 1
                if bad_ids <= 3:
                    print(f"  {name}: {s!r}\n    sentencepiece {want}\n    tokenizers    {got}")
            bad_text += tok.decode(want) != sp.decode(want)
        failed |= bad_ids > 0
        print(f"{name}: {bad_ids} of {len(strings)} encodings differ; {bad_text} decodings differ")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
