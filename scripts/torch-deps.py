"""Print the installed torch's requirements for this platform, one per line, less the
names given with --without (scripts/train-test.sh installs torch with --no-deps, then these)."""
import argparse
import importlib.metadata as md

from pip._vendor.packaging.requirements import Requirement

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--without", action="append", default=[], help="a requirement to leave out")
args = ap.parse_args()
for line in md.requires("torch") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name in args.without:
        continue
    req.marker = None
    print(req)
