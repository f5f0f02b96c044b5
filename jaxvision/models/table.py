"""The zoo as a markdown table, for docs/models.md: parameters counted from the models themselves
(`jax.eval_shape`, no compute), default resolution and published top-1 from the model cards.

    python -m jaxvision.models.table                          # print it
    python -m jaxvision.models.table --write docs/models.md  # replace the table between its markers
"""

from __future__ import annotations

import argparse

from jaxvision.models import registry, util

BEGIN, END = "<!-- zoo table: python -m jaxvision.models.table --write docs/models.md -->", "<!-- end of zoo table -->"


def markdown(counts: dict | None = None) -> str:
    """The table; `counts` (name -> parameters) saves counting them from the models."""
    lines = ["| model | family | params | default res | mean/std | ImageNet top-1 of reference weights |",
             "|---|---|---:|---:|---|---|"]
    for name in registry.list_models():
        card = registry.model_card(name, feature_info=False)
        params = (counts or {}).get(name) or util.count_params(
            util.init_shapes(registry.create(name), image_size=32)["params"])
        norm = {registry.HALF: "0.5", registry.CIFAR10_MEAN: "CIFAR-10"}.get(card.mean, "ImageNet")
        lines.append(f"| {name} | {card.family} | {params:,} | {card.input_size} | {norm} | {card.top1} |")
    return "\n".join(lines)


def replace(document: str, table: str) -> str:
    """`document` with the text between the table's markers replaced by `table`."""
    head, _, rest = document.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="FILE", help="replace the table between the markers in FILE")
    args = parser.parse_args()
    table = markdown()
    if not args.write:
        print(table)
        return
    with open(args.write) as f:
        document = f.read()
    with open(args.write, "w") as f:
        f.write(replace(document, table))


if __name__ == "__main__":
    main()
