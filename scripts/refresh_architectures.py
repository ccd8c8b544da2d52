"""Regenerate service/core/transformers_architectures.txt: the model classes of the pinned
transformers release that the API accepts in config.json (the API image has no transformers).

    .venv/bin/python scripts/refresh_architectures.py
"""

from pathlib import Path

LIST = Path(__file__).resolve().parents[1] / "service" / "core" / "transformers_architectures.txt"


def model_classes() -> list[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attribute in dir(modeling_auto):
        if not attribute.endswith("_MAPPING_NAMES"):
            continue
        for value in getattr(modeling_auto, attribute).values():
            for name in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(name, str) and not name.endswith("Config"):
                    names.add(name)
    return sorted(names)


if __name__ == "__main__":
    LIST.write_text("\n".join(model_classes()) + "\n")
    print(f"wrote {LIST}")
