# Sourced by the fetch scripts: downloads are checked against pinned sha256 sums.
# check_sha256 FILE SHA256: fails, saying what to do, unless FILE's sha256 is SHA256.
check_sha256() {
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    if [ "$got" != "$2" ]; then
        echo "sha256 mismatch for $1: got $got, expected the pinned $2" >&2
        echo "(a damaged or different file: delete it and run this script again)" >&2
        return 1
    fi
}
