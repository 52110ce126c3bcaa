"""Options of the router families that need more than `model.moe`'s common keys, one nested
section per family (`model.moe.<family>`), validated only when that family is in use.

Add a family: a dataclass here with `SECTION: ClassVar[str] = "model.moe.<family>"`, defaults
from papers.md (values papers.md marks [unverified] are documented next to the field), a
`validate()` and an `in_use(self, moe) -> bool` method (e.g. `moe.router == "race"`); then a
field `<family>: <Options> = field(default_factory=<Options>)` in `schema.MoEConfig`.
"""

from __future__ import annotations


def validate_families(moe) -> None:
    """Validate the section of every family the config uses (the router's own, and add-ons
    such as entropy losses that apply to any router)."""
    import dataclasses

    for f in dataclasses.fields(moe):
        section = getattr(moe, f.name)
        if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
            in_use = getattr(section, "in_use", None)
            if in_use is None or in_use(moe):
                section.validate()
