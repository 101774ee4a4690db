"""Fails when a package in a crate's resolved dependency graph declares a
rust-version above the given one: what a user's fresh lock file would need
beyond the minimum Rust that tower-lb promises.

Usage: python3 ci/check_lock_msrv.py MSRV  (reads `cargo metadata` JSON on stdin)
"""
import json
import sys


def version(text):
    """`1.85` and `1.85.0` alike, as three numbers."""
    parts = [int(part) for part in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    msrv = version(sys.argv[1])
    metadata = json.load(sys.stdin)
    too_new = sorted(
        f"{p['name']} {p['version']} needs Rust {p['rust_version']}"
        for p in metadata["packages"]
        if p.get("rust_version") and version(p["rust_version"]) > msrv
    )
    if too_new:
        print(f"packages that need more than Rust {sys.argv[1]}:")
        for line in too_new:
            print(f"  {line}")
        sys.exit(1)
    print(f"all {len(metadata['packages'])} packages build on Rust {sys.argv[1]} by their rust-version")


main()
