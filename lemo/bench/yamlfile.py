"""YAML files of the harness (sweeps, experiments, thresholds), read strictly: a key given twice in one
mapping is an error, not a silent override (`{shared_selection: false, ..., shared_selection: true}`
once hid which options a committed run used)."""

from __future__ import annotations

from pathlib import Path

import yaml


class _StrictLoader(yaml.SafeLoader):
    pass


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice in one mapping (remove one)", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml(path: str | Path):
    """The file's data; ValueError naming the file for invalid YAML or a duplicated key."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
