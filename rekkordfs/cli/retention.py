"""`forget` and `prune`: remove snapshots, then the data nothing needs."""

from __future__ import annotations

import argparse

from rekkordfs.errors import UsageError
from rekkordfs.forget import ForgetPlan, plan_by_ids, plan_by_policy
from rekkordfs.forget import forget as forget_snapshots
from rekkordfs.keys import Capability
from rekkordfs.prune import DEFAULT_GRACE, DEFAULT_REPACK_BELOW, PruneOptions, Pruner, PruneReport
from rekkordfs.repository import Repository
from rekkordfs.retention import Duration, Policy

from .common import ConfigMaker, load_keys, quiet, warn
from .interrupt import run_trio
from .output import human_size, iso_time, local_time, plural, print_json, print_table

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def _policy(args: argparse.Namespace) -> Policy | None:
    counts = {rule: getattr(args, f"keep_{rule}") or 0 for rule in RULES}
    within = Duration.parse(args.keep_within) if args.keep_within else None
    if not any(counts.values()) and within is None:
        return None
    return Policy(within=within, **counts)


def prune_options(args: argparse.Namespace) -> PruneOptions:
    grace = Duration.parse(args.grace) if args.grace is not None else DEFAULT_GRACE
    repack = args.repack_below if args.repack_below is not None else DEFAULT_REPACK_BELOW
    if not 0 <= repack <= 1:
        raise UsageError("--repack-below takes a fraction between 0 and 1 (e.g. 0.9)")
    return PruneOptions(grace=grace, repack_below=repack, dry_run=args.dry_run)


def forget(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    policy = _policy(args)
    if bool(args.ids) == (policy is not None):
        raise UsageError("forget takes snapshot IDs or --keep-* rules (one or the other)")
    if args.ids and args.channel:
        raise UsageError("--channel goes with --keep-* rules, not with snapshot IDs")
    options = prune_options(args) if args.prune else None
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.FORGET)

    async def run() -> tuple[ForgetPlan, PruneReport | None]:
        async with Repository.connect(config, keys) as repo:
            if policy is None:
                plan = await plan_by_ids(repo, args.ids)
            else:
                plan = await plan_by_policy(repo, policy, args.channel)
            if not args.dry_run:
                await forget_snapshots(repo, plan)
            report = await Pruner(repo, options, progress=warn).run() if options is not None else None
            return plan, report

    plan, report = run_trio(run)
    removed = len(plan.removed) + len(plan.unlisted)
    if args.format == "json":
        print_json({
            "dry_run": args.dry_run,
            "snapshots": [{"id": tag.id_hex, "channel": tag.channel, "time": iso_time(tag.time_ns),
                           "action": "keep" if decision.keep else "remove", "reasons": decision.reasons}
                          for tag, decision in plan.decisions]
                         + [{"id": snapshot_id.hex(), "channel": None, "time": None, "action": "remove",
                             "reasons": []} for snapshot_id in plan.unlisted],
            "removed": removed,
            "prune": _report_json(report) if report is not None else None,
        })
        return 3 if report is not None and report.problems else 0
    if not quiet(args):
        rows = [("ID", "Channel", "Time", "Action", "Kept by")]
        rows += [(tag.id_hex[:16], tag.channel, local_time(tag.time_ns),
                  "keep" if decision.keep else ("would remove" if args.dry_run else "remove"),
                  ", ".join(decision.reasons)) for tag, decision in plan.decisions]
        rows += [(snapshot_id.hex()[:16], "", "(not listed)", "would remove" if args.dry_run else "remove", "")
                 for snapshot_id in plan.unlisted]
        print_table(rows)
        verb = "Would remove" if args.dry_run else "Removed"
        print(f"{verb} {plural(removed, 'snapshot')}")
        if report is not None:
            _print_report(report, args.dry_run)
    return 3 if report is not None and report.problems else 0


def prune(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    options = prune_options(args)
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.FORGET)

    async def run() -> PruneReport:
        async with Repository.connect(config, keys) as repo:
            return await Pruner(repo, options, progress=warn).run()

    report = run_trio(run)
    if args.format == "json":
        print_json({"dry_run": args.dry_run, **_report_json(report)})
    elif not quiet(args):
        _print_report(report, args.dry_run)
    return 3 if report.problems else 0


def _report_json(report: PruneReport) -> dict:
    return {
        "deleted": {"packs": report.packs_deleted, "bytes": report.bytes_deleted,
                    "snapshot_records": report.records_deleted, "objects": report.objects_deleted},
        "repacked": {"packs": report.packs_repacked, "bytes_copied": report.bytes_copied},
        "condemned": {"packs": report.packs_condemned, "bytes": report.bytes_condemned},
        "waiting": {"packs": report.packs_waiting, "bytes": report.bytes_waiting},
        "stored_bytes": report.bytes_stored,
        "problems": report.problems,
    }


def _print_report(report: PruneReport, dry_run: bool) -> None:
    would = "would be " if dry_run else ""
    print_table([
        ("Deleted" if not dry_run else "To delete", f"{plural(report.packs_deleted, 'pack')} "
         f"({human_size(report.bytes_deleted)}), {plural(report.records_deleted, 'snapshot record')}, "
         f"{plural(report.objects_deleted, 'object')} in all"),
        ("Repacked" if not dry_run else "To repack", f"{plural(report.packs_repacked, 'pack')} "
         f"({human_size(report.bytes_copied)} {would}copied)"),
        ("Condemned", f"{plural(report.packs_condemned, 'pack')} ({human_size(report.bytes_condemned)}), "
         "deleted by a prune once the grace period is over"),
        ("Waiting", f"{plural(report.packs_waiting, 'pack')} ({human_size(report.bytes_waiting)}) "
         "condemned earlier, grace not over"),
        ("Stored", f"{human_size(report.bytes_stored)} in packs"),
    ])
