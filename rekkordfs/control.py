"""How `rekkord commit` talks to a running mount: extended attributes of
MNT/staging/<channel>, never listed (so rsync -X skips them).

Kept apart from stagingarea.py so that the command imports nothing heavy.
"""

CONTROL_CHANNEL = b"user.rekkord.channel"  # get: the channel name (is this a staging root?)
CONTROL_COMMIT = b"user.rekkord.commit"  # set to a token: commit; get CONTROL_COMMIT + b"." + token: result
