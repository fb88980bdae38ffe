"""`scripts/soak N`: a reliability loop over random trees with random kills and
storage faults, every committed snapshot verified after each iteration.

    trees.py    the seeded generator of source trees (and their changes)
    procs.py    running rekkord, rsync and mounts; stop points, kills, cleanup
    faults.py   storage faults: a full or read-only repository disk (local),
                a server stopped and restarted (S3, SFTP)
    loop.py     one iteration (save, restore, mount + rsync + commit) and the checks
    __main__.py options, the backend, the summary

See docs/testing.md.
"""
