"""`voice-agent data list|delete` and `voice-agent export dpo|sft`."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from datetime import UTC, datetime


def _directory(args: argparse.Namespace) -> str | None:
    if args.dir:
        return str(args.dir)
    from agent.config import ConfigError, load_settings

    try:
        return load_settings(args.config).record
    except ConfigError as exc:
        print(f"voice-agent: {exc}", file=sys.stderr)
        return None


def run_data(args: argparse.Namespace) -> int:
    from agent.record.store import RecordingStore

    directory = _directory(args)
    if not directory:
        print("voice-agent data: which recording? --dir DIR (or `record:` in --config)", file=sys.stderr)
        return 2
    try:
        store = RecordingStore.open(directory, create=False)
    except (OSError, sqlite3.Error) as exc:
        print(f"voice-agent data: {exc}", file=sys.stderr)
        return 2
    try:
        if args.action == "list":
            for s in store.sessions():
                started = datetime.fromtimestamp(s["started_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
                print(f"{s['id']}\t{started}Z\t{s['turns']} turns\t{s['feedback']} ratings\t{s['model'] or ''}")
            return 0
        missing = [sid for sid in args.sessions if not store.delete_session(sid)]
        for sid in args.sessions:
            if sid not in missing:
                print(f"deleted {sid}")
        if missing:
            print(f"voice-agent data: no such session: {', '.join(missing)}", file=sys.stderr)
            return 1
        return 0
    finally:
        store.close()


def run_export(args: argparse.Namespace) -> int:
    from agent.export import ExportError, export

    try:
        path, n = export(args.dir, args.out, args.kind, args.format, with_corrections=args.with_corrections)
    except (OSError, sqlite3.Error) as exc:
        print(f"voice-agent export: {exc}", file=sys.stderr)
        return 2
    except ExportError as exc:
        print(f"voice-agent export: a written row is not valid: {exc}", file=sys.stderr)
        return 1
    print(f"{n} {args.kind} row{'s' if n != 1 else ''} → {path}")
    return 0
