"""Editing a written test checkpoint in place."""

import json


def edit_config(path, fn):
    """Apply ``fn`` to the parsed ``config.json`` of ``path`` and write it back."""
    p = f"{path}/config.json"
    with open(p) as f:
        raw = json.load(f)
    fn(raw)
    with open(p, "w") as f:
        json.dump(raw, f)
