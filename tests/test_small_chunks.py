"""Read-ahead of small files: open_small_chunks() reads and decodes a batch in
one worker hop; a damaged or missing blob is that blob's error alone."""

from __future__ import annotations

from pathlib import Path

from rekkordfs.codec import pack_key
from rekkordfs.errors import RekkordError
from rekkordfs.format import EntryKind

from .core_helpers import open_view, run, src_parts, view_walk
from .test_vfs_core import corrupt, snapshot_ino
from .trees import make_random_files


def test_small_chunks_one_hop_and_each_error_stays_with_its_blob(local_repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    contents = make_random_files(src, 30, 2_000, seed=11, width=2)
    local_repo.save("c", str(src))

    async def main() -> None:
        async with open_view(local_repo.repository, local_repo.key_file) as view:
            root = await view_walk(view, await snapshot_ino(view, "c"), src_parts(src))
            listing = await view.blobs.directory(view.node(root).dir_ref)
            entries = [e for e in listing.entries if e.kind == EntryKind.FILE]
            chunks = [e.chunks[0] for e in entries]
            assert len({c.location.pack for c in chunks}) == 1  # small files share a pack
            repo = view.repo
            hops = 0
            run_cpu = repo.run_cpu

            async def counting(fn, *args):
                nonlocal hops
                hops += 1
                return await run_cpu(fn, *args)

            repo.run_cpu = counting
            results = await repo.open_small_chunks(chunks)
            assert hops == 1
            assert [bytes(r) for r in results] == [contents[e.name] for e in entries]

            corrupt(Path(local_repo.repository), chunks[3].location)
            results = await repo.open_small_chunks(chunks)
            assert isinstance(results[3], RekkordError)
            assert [bytes(r) for i, r in enumerate(results) if i != 3] == \
                [contents[e.name] for i, e in enumerate(entries) if i != 3]

            (Path(local_repo.repository) / pack_key(chunks[0].location.pack)).unlink()
            results = await repo.open_small_chunks(chunks)  # the pack is gone: each blob reports it
            assert len(results) == len(chunks) and all(isinstance(r, RekkordError) for r in results)

    run(main)
