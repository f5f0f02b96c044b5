"""Print the README's model-zoo table: parameters counted from the models themselves
(`jax.eval_shape`, no compute), default resolution and published top-1 from the model cards.

    python experiments/zoo_table.py
"""

from jaxvision import models


def main():
    print("| model | family | params | default res | mean/std | ImageNet top-1 of reference weights |")
    print("|---|---|---:|---:|---|---|")
    for name in models.list_models():
        card = models.model_card(name)
        params = models.count_params(models.init_shapes(models.create(name), image_size=32)["params"])
        norm = "0.5" if card.mean == (0.5, 0.5, 0.5) else "ImageNet"
        print(f"| {name} | {card.family} | {params:,} | {card.input_size} | {norm} | {card.top1} |")


if __name__ == "__main__":
    main()
