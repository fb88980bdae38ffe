"""scripts/bench: rekkordfs beside restic and borg on the same generated data.

    scripts/bench [--data DIR] [--only ROW,...] [--tools rekkordfs,restic,borg]
                  [--repeat N] [--json FILE] [--backends local,s3,sftp] [--verify] [--list]
                  [--rekkordfs-rev REV] [--compare-rev REV,...] [--columns C,...]

Prints one table: for each row and tool the wall time, MB/s (logical bytes /
wall time), peak RSS and repository size after the row, and the ratio of
rekkordfs's time to the best peer's (below 1: rekkordfs is faster).

Two revisions of rekkordfs in one run: --compare-rev OLD adds the tool
rekkordfs@OLD (OLD's code, a frozen copy run with the same venv) beside
rekkordfs, in the same lockstep rows, and a column rekkordfs/rekkordfs@OLD
(new time / old time; above 1: the new one is slower). With --rekkordfs-rev
HEAD the new side is a frozen copy of HEAD too (run both the same way and
immune to commits during the run):

    scripts/bench --rekkordfs-rev HEAD --compare-rev 4326053 --tools rekkordfs,restic,borg
    scripts/bench --rekkordfs-rev HEAD --compare-rev 4326053 --tools rekkordfs
                  --only save_tree,restore_tree,mount_catall --repeat 3 --columns time,cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .backends import Backend, make_backend
from .data import SCALE_FILES, Params, generate, generate_history, generate_scale
from .measure import NotAvailable, ToolFailure, loadavg, unmount
from .rows import ROWS, Context, Result, Row, rows_by_name
from .tools import PEERS, TOOLS, add_revision, remove_tree

DEFAULT_ROOT = Path("/var/tmp/rekkordfs-bench")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- planning and running ----------------------------------------------------------------

def plan(selected: list[str], tool: str) -> list[Row]:
    """The rows TOOL runs, in registry order: the selected ones, what they require, and
    for peers the rows that selected rekkordfs-only rows compare against."""
    by_name = rows_by_name()
    kind = TOOLS[tool].kind  # every copy of rekkordfs runs the rekkordfs-only rows
    need: set[str] = set()

    def add(name: str) -> None:
        if name not in need:
            need.add(name)
            for req in by_name[name].requires:
                add(req)

    for name in selected:
        row = by_name[name]
        if row.tools is None or kind in row.tools:
            add(name)
        elif row.compare_to and kind in PEERS:
            add(row.compare_to)
    return [r for r in ROWS if r.name in need and (r.tools is None or kind in r.tools)]


def run_pass(tools: list[str], selected: list[str], ds, work: Path, backends: dict[str, Backend],
             verify: bool, keep: bool) -> dict[str, dict[str, Result]]:
    """One pass over the selected rows, in lockstep: each row runs for every tool before
    the next row starts, so a busy machine disturbs all tools alike rather than one."""
    contexts: dict[str, Context] = {}
    orders = {t: plan(selected, t) for t in tools}
    results: dict[str, dict[str, Result]] = {t: {} for t in tools}
    for t in tools:
        home = work / "home" / TOOLS[t].slug()
        remove_tree(home)
        remove_tree(work / "repos" / TOOLS[t].slug())
        contexts[t] = Context(TOOLS[t](home), ds, work, backends, verify)
    width = max(map(len, tools))
    try:
        for row in ROWS:
            for t in tools:
                order = orders[t]
                if row not in order:
                    continue
                res = run_row(contexts[t], row, results[t])
                results[t][row.name] = res
                shown = f"{res.seconds:.2f} s" if res.ok else f"{res.status}: {res.note}"
                extra = f"  {res.mbps:.0f} MB/s" if res.mbps else ""
                if res.cpu is not None:
                    extra += f"  cpu {res.cpu:.2f} s"
                if res.ok and "commit_seconds" in res.extra:  # staging rows: where the time went
                    x = res.extra
                    extra += f"  [rsync {x['rsync_seconds']:.2f} s + commit {x['commit_seconds']:.2f} s"
                    extra += f", daemon {x['daemon_rss'] / 1e6:.0f} MB]" if x.get("daemon_rss") else "]"
                if res.load is not None:
                    extra += f"  (load {res.load:.1f})"
                log(f"  {row.name:<20} {t:<{width}} {shown}{extra}")
                later = order[order.index(row) + 1:]
                contexts[t].release({u for r in later for u in r.uses})
    finally:
        for t, ctx in contexts.items():
            ctx.close()
            if not keep:
                remove_tree(work / "repos" / TOOLS[t].slug())
                remove_tree(work / "home" / TOOLS[t].slug())
        if not keep:
            remove_tree(work / "restore")
    return results


def run_row(ctx: Context, row: Row, done: dict[str, Result]) -> Result:
    missing = [r for r in row.requires if r in done and not done[r].ok]
    if missing:
        first = done[missing[0]]
        status = "n/a" if first.status == "n/a" else "skipped"
        return Result(status=status, note=f"needs {missing[0]} ({first.status})")
    if row.feature and not ctx.tool.supports(row.feature):
        return Result(status="n/a", note=f"{ctx.tool.name} has no {row.feature} commands")
    load = loadavg()
    try:
        res = row.func(ctx)
    except NotAvailable as exc:
        return Result(status="n/a", note=str(exc))
    except ToolFailure as exc:
        return Result(status="FAIL", note=str(exc))
    res.load = load
    return res


def best(results: list[Result]) -> Result:
    ok = [r for r in results if r.ok and r.seconds is not None]
    if ok:
        return min(ok, key=lambda r: r.seconds)
    return results[-1]


# --- the table ---------------------------------------------------------------------------

def fmt_time(s: float) -> str:
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def fmt_mb(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e6:.1f} MB"


def fmt_rate(r: float | None) -> str:
    if r is None:
        return ""
    return f"{r:.0f}" if r >= 10 else f"{r:.1f}"


COLUMNS = ("time", "mbps", "cpu", "rss", "repo")


def ratio_of(row: Row, table: dict[str, dict[str, Result]], tools: list[str]) -> tuple[float | None, str]:
    """rekkordfs time / best peer time, and that peer's name."""
    mine = table[row.name].get("rekkordfs")
    if "rekkordfs" not in tools or mine is None or not mine.ok:
        return None, ""
    source = row.compare_to or row.name
    peers = [(table.get(source, {}).get(p), p) for p in PEERS if p in tools]
    peers = [(r.seconds, p) for r, p in peers if r is not None and r.ok and r.seconds]
    if not peers:
        return None, ""
    seconds, peer = min(peers)
    return mine.seconds / seconds, peer


def revisions(tools: list[str]) -> list[str]:
    """The other copies of rekkordfs (--compare-rev) that "rekkordfs" is compared with."""
    if "rekkordfs" not in tools:
        return []
    return [t for t in tools if t != "rekkordfs" and TOOLS[t].kind == "rekkordfs"]


def revision_ratio(row: Row, table: dict[str, dict[str, Result]], old: str) -> float | None:
    """rekkordfs time / rekkordfs@OLD time on the same row (above 1: the new one is slower)."""
    new, was = table[row.name].get("rekkordfs"), table[row.name].get(old)
    if new is None or was is None or not (new.ok and was.ok) or not (new.seconds and was.seconds):
        return None
    return new.seconds / was.seconds


def size_ratios(row: Row, table: dict[str, dict[str, Result]], tools: list[str]) -> list[str]:
    """For rows whose repository size after matters (retention): each rekkordfs copy's
    size against each peer's, as text."""
    out = []
    for t in tools:
        mine = table[row.name].get(t)
        if TOOLS[t].kind != "rekkordfs" or mine is None or not mine.ok or not mine.repo_disk:
            continue
        versus = [f"{mine.repo_disk / r.repo_disk:.2f}x {p}" for p in PEERS if p in tools
                  if (r := table[row.name].get(p)) is not None and r.ok and r.repo_disk]
        out.append(f"{t} {fmt_mb(mine.repo_disk)}" + (f" ({', '.join(versus)})" if versus else ""))
    return out


def render(shown: list[Row], table: dict[str, dict[str, Result]], tools: list[str],
           columns: tuple[str, ...] = COLUMNS) -> tuple[str, list[str]]:
    names = {"time": None, "mbps": "MB/s", "cpu": "CPU", "rss": "RSS", "repo": "repo"}
    header = ["row"]
    for t in tools:
        header += [f"{t} time" if c == "time" else names[c] for c in columns]
    with_peers = "rekkordfs" in tools and any(p in tools for p in PEERS)
    olds = revisions(tools)
    if with_peers:
        header += ["ratio"]
    header += [f"rekkordfs/{old}" for old in olds]
    lines = [header]
    notes: list[str] = []
    for row in shown:
        cells = [row.label]
        for t in tools:
            res = table[row.name].get(t)
            if res is None:
                cells += ["·"] + [""] * (len(columns) - 1)
            elif res.ok:
                values = {"time": fmt_time(res.seconds), "mbps": fmt_rate(res.mbps),
                          "cpu": f"{res.cpu:.1f} s" if res.cpu is not None else "",
                          "rss": fmt_mb(res.rss), "repo": fmt_mb(res.repo_disk)}
                cells += [values[c] for c in columns]
            else:
                notes.append(f"{row.name} / {t}: {res.status}: {res.note}")
                cells += [res.status] + [""] * (len(columns) - 1)
        if with_peers:
            ratio, peer = ratio_of(row, table, tools)
            if ratio is None:
                cells.append("")
            else:
                versus = f" vs {peer}" + (f" {row.compare_to}" if row.compare_to else "")
                cells.append(f"{ratio:.2f}{versus}")
        for old in olds:
            ratio = revision_ratio(row, table, old)
            cells.append("" if ratio is None else f"{ratio:.2f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("| " + " | ".join(padded) + " |")
        if n == 0:
            rules = (("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths))
            out.append("|" + "|".join(rules) + "|")
    for row in shown:
        if row.compare_size and (sizes := size_ratios(row, table, tools)):
            out.append(f"repository size after {row.label}: {'; '.join(sizes)}")
    return "\n".join(out), notes


# --- main --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="DIR", type=Path, default=DEFAULT_ROOT,
                   help=f"folder for the generated data set and the work files (default {DEFAULT_ROOT})")
    p.add_argument("--seed", type=int, default=Params.seed, help="data set seed (default %(default)s)")
    p.add_argument("--only", metavar="ROW,...", help="run only these rows (and what they need); see --list")
    p.add_argument("--tools", metavar="T,...", default="rekkordfs,restic,borg",
                   help="default %(default)s; rekkordfs@REV is rekkordfs as committed at REV (see --compare-rev)")
    p.add_argument("--backends", metavar="B,...", default="local",
                   help="local, s3, sftp: which backends' rows run by default (default %(default)s)")
    p.add_argument("--scale", type=int, nargs="?", const=SCALE_FILES, metavar="N",
                   help=f"the scale rows: N small files of 0-2 KiB in 1,000 folders (default {SCALE_FILES}); "
                        "alone, only those rows run (with --only, they run at N files)")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="run N times, report the best time of each row")
    p.add_argument("--json", metavar="FILE", type=Path, help="also write every figure to FILE")
    p.add_argument("--verify", action="store_true",
                   help="also compare every restored tree and the mounted tree byte for byte (untimed)")
    p.add_argument("--rekkordfs-rev", metavar="REV",
                   help="bench rekkordfs as committed at REV (e.g. HEAD), from a copy under DIR/work, "
                        "instead of the work tree (which others may change during a long run)")
    p.add_argument("--compare-rev", metavar="REV,...",
                   help="also bench rekkordfs as committed at each REV, as the tool rekkordfs@SHA beside "
                        "rekkordfs in the same lockstep rows (own HOME, caches and repositories; a frozen "
                        "copy under DIR/work run with the same venv, old layouts included), and add the "
                        "column rekkordfs/rekkordfs@SHA: new time / old time per row (above 1: slower). "
                        "E.g. --rekkordfs-rev HEAD --compare-rev 4326053")
    p.add_argument("--columns", metavar="C,...", default=",".join(COLUMNS),
                   help="per-tool columns of the table, among %(default)s (e.g. time,cpu with many tools)")
    p.add_argument("--keep", action="store_true", help="keep repositories and caches under DIR/work")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for r in ROWS:
            req = f" (needs {', '.join(r.requires)})" if r.requires else ""
            only = f" [{', '.join(r.tools)} only]" if r.tools else ""
            print(f"{r.name:<22} {r.group:<8} {r.label}{only}{req}")
        return 0
    columns = tuple(c.strip() for c in args.columns.split(",") if c.strip())
    if not columns or set(columns) - set(COLUMNS):
        sys.exit(f"scripts/bench: --columns takes some of {', '.join(COLUMNS)}")
    root: Path = args.data.resolve()
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    remove_tree(work / "restored")  # an interrupted run's restored trees (rows.set_aside)
    tools = resolve_tools(args, work)
    by_name = rows_by_name()
    backends_wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.only:
        selected = [r.strip() for r in args.only.split(",") if r.strip()]
        unknown = [r for r in selected if r not in by_name]
        if unknown:
            sys.exit(f"scripts/bench: unknown row(s) {', '.join(unknown)} (see --list)")
    elif args.scale:
        selected = [r.name for r in ROWS if r.group == "scale"]
    else:  # the scale rows take minutes per tool: only when asked for
        selected = [r.name for r in ROWS if r.backend in backends_wanted and r.group != "scale"]

    ds = generate(root / "data", Params(seed=args.seed), log=log)
    if any(by_name[r.name].feature == "retention" for t in tools for r in plan(selected, t)):
        generate_history(ds, log=log)
    if any(by_name[r.name].group == "scale" for t in tools for r in plan(selected, t)):
        ds.scale = generate_scale(root / "data" / f"scale-{args.scale or SCALE_FILES}",
                                  args.scale or SCALE_FILES, args.seed, log=log)
    _clear_stale_mounts(work)
    for t in tools:
        if TOOLS[t].kind == "rekkordfs":  # no copy compiles itself during a timed row
            TOOLS[t](work / "home" / TOOLS[t].slug()).compile()

    needed_backends = {by_name[r].backend for t in tools for r in map(lambda x: x.name, plan(selected, t))}
    backends: dict[str, Backend] = {}
    for name in sorted(needed_backends):
        backend = make_backend(name, work)
        try:
            backend.start()
        except NotAvailable as exc:
            backend.failed = str(exc)  # type: ignore[attr-defined]
            log(f"backend {name}: {exc}")
        backends[name] = backend

    meta = environment(tools, ds, args)
    log("versions: " + "; ".join(meta["versions"].values()))
    runs: dict[str, dict[str, list[Result]]] = {r: {} for r in by_name}
    started = time.monotonic()
    try:
        for n in range(args.repeat):
            order = tools[n % len(tools):] + tools[:n % len(tools)]  # who goes first rotates
            log(f"pass {n + 1}/{args.repeat}: {', '.join(order)}")
            results = run_pass(order, selected, ds, work, backends, args.verify, args.keep)
            for tool in tools:
                for name, res in results[tool].items():
                    runs[name].setdefault(tool, []).append(res)
    finally:
        for backend in backends.values():
            backend.stop()
        remove_tree(work / "restored")  # the restored trees, kept until no row follows

    if "rekkordfs" in tools and not args.rekkordfs_rev:
        final = TOOLS["rekkordfs"](work / "home" / "versions").version()
        if final != meta["versions"]["rekkordfs"]:
            meta["versions_at_end"] = {"rekkordfs": final}
            log(f"warning: rekkordfs changed during the run: {meta['versions']['rekkordfs']} -> {final}")
    shown = [r for r in ROWS if r.name in selected]
    table = {name: {t: best(rs) for t, rs in per_tool.items()} for name, per_tool in runs.items()}
    text, notes = render(shown, table, tools, columns)
    print()
    print(f"rekkordfs bench: {ds.tree_files} files / {ds.tree_bytes / 1e6:.0f} MB tree, "
          f"{ds.big_bytes / 2**30:.0f} GiB random file; "
          + (f"scale: {ds.scale.files} files / {ds.scale.bytes / 1e6:.0f} MB; " if ds.scale else "")
          + f"best of {args.repeat}; "
          f"{os.cpu_count()} CPUs; {time.monotonic() - started:.0f} s; {'; '.join(meta['versions'].values())}")
    if "versions_at_end" in meta:
        print(f"warning: rekkordfs changed during the run (now {meta['versions_at_end']['rekkordfs']}): "
              f"rows may mix versions")
    print(text)
    print("time: wall seconds; MB/s: logical MB (10^6 bytes) / wall; CPU: user+system seconds; "
          "RSS: peak resident set; (mount rows: CPU and RSS of the mount daemon); "
          "repo: du -s of the repository after the row (S3: sum of object sizes)"
          + ("; ratio: rekkordfs time / best peer time (< 1: rekkordfs is faster)"
             if "rekkordfs" in tools and any(p in tools for p in PEERS) else "")
          + "".join(f"; rekkordfs/{old}: rekkordfs time / {old} time (> 1: the new one is slower)"
                    for old in revisions(tools)))
    loads = [r.load for per_tool in table.values() for r in per_tool.values() if r.load is not None]
    if loads and max(loads) > 1.5:
        print(f"warning: the machine was busy (1-minute load average up to {max(loads):.1f} on "
              f"{os.cpu_count()} CPUs): wall times are noisy; CPU seconds are steadier")
    for note in notes:
        print(f"  {note}")

    if args.json:
        doc = {
            "meta": meta,
            "rows": [
                {
                    "name": r.name, "label": r.label, "group": r.group, "backend": r.backend,
                    "compare_to": r.compare_to,
                    "ratio": ratio_of(r, table, tools)[0], "ratio_peer": ratio_of(r, table, tools)[1],
                    "ratio_revisions": {old: revision_ratio(r, table, old) for old in revisions(tools)},
                    "results": {t: {"best": _result_json(table[r.name][t]),
                                    "runs": [_result_json(x) for x in runs[r.name][t]]}
                                for t in tools if t in table[r.name]},
                }
                for r in shown
            ],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 0


def resolve_tools(args: argparse.Namespace, work: Path) -> list[str]:
    """The tools of the run, in table order: --tools, where rekkordfs@REV names a frozen
    copy of REV, and the --compare-rev copies right after "rekkordfs"."""
    def frozen(rev: str) -> str:
        try:
            return add_revision(rev, work)
        except ValueError as exc:
            sys.exit(f"scripts/bench: {exc}")

    if args.rekkordfs_rev:
        try:
            log(f"rekkordfs from {args.rekkordfs_rev}: {TOOLS['rekkordfs'].freeze(args.rekkordfs_rev, work)}")
        except ValueError as exc:
            sys.exit(f"scripts/bench: --rekkordfs-rev: {exc}")
    tools: list[str] = []
    for t in (t.strip() for t in args.tools.split(",") if t.strip()):
        if t.startswith("rekkordfs@"):
            t = frozen(t.split("@", 1)[1])
        elif t not in TOOLS:
            sys.exit(f"scripts/bench: unknown tool {t!r} (choose from {', '.join(TOOLS)}, or rekkordfs@REV)")
        if t not in tools:
            tools.append(t)
    olds = [frozen(rev.strip()) for rev in (args.compare_rev or "").split(",") if rev.strip()]
    at = tools.index("rekkordfs") + 1 if "rekkordfs" in tools else 0
    for old in olds:
        if old not in tools:
            tools.insert(at, old)
            at += 1
        log(f"{old}: rekkordfs as committed at {old.split('@')[1]} (frozen copy), beside rekkordfs")
    if olds and "rekkordfs" not in tools:
        log("warning: --compare-rev without rekkordfs in --tools: no new/old column")
    return tools


def _result_json(r: Result) -> dict:
    d = asdict(r)
    d["mbps"] = r.mbps
    return d


def environment(tools: list[str], ds, args) -> dict:
    versions = {}
    for t in tools:
        try:
            # a HOME under the work folder: the bytecode cache goes beside the others
            # (PYTHONPYCACHEPREFIX is HOME/../../pycache), not to /pycache
            versions[t] = TOOLS[t](args.data.resolve() / "work" / "home" / "versions").version()
        except Exception as exc:  # noqa: BLE001 - informative only
            versions[t] = f"{t} (version unknown: {exc})"
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(), "cpu": cpu,
        "python": platform.python_version(), "versions": versions,
        "settings": {t: TOOLS[t].settings for t in tools},
        "data": {"root": str(ds.root), **ds.extra},
        "repeat": args.repeat,
    }


def _clear_stale_mounts(work: Path) -> None:
    """Unmounts what an interrupted earlier run left mounted under WORK."""
    prefix = str(work.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in points:
        if point.startswith(prefix):
            log(f"unmounting stale {point}")
            unmount(Path(point))


if __name__ == "__main__":
    sys.exit(main())
