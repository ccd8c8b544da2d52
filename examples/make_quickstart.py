"""Make the quickstart's model and data on this machine, offline: a small BERT classifier,
trained for a few seconds to tell whether a sentence of random words contains the word 7, as a
zipped Hugging Face folder, and 512 labelled rows as a .safetensors file.

    .venv/bin/python examples/make_quickstart.py quickstart/
"""

import sys
import zipfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

VOCAB, LENGTH, ROWS = 100, 16, 512


def data(rows: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(8, VOCAB, (rows, LENGTH), generator=generator)
    labels = torch.randint(0, 2, (rows,), generator=generator)
    positions = torch.randint(0, LENGTH, (rows,), generator=generator)
    input_ids[labels == 1, positions[labels == 1]] = 7  # the word that makes the label 1
    return {"input_ids": input_ids, "labels": labels}


def trained_model() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=LENGTH,
    )
    config.num_labels = 2
    model = transformers.BertForSequenceClassification(config)
    train = data(2048, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):  # epochs
        for start in range(0, 2048, 64):
            batch = {k: v[start : start + 64] for k, v in train.items()}
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model = trained_model()
    saved = folder / "model"
    model.save_pretrained(saved)
    with zipfile.ZipFile(folder / "model.zip", "w") as archive:
        for file in sorted(saved.iterdir()):
            archive.write(file, file.name)
    save_file(data(ROWS, seed=2), str(folder / "data.safetensors"))
    print(f"wrote {folder / 'model.zip'} and {folder / 'data.safetensors'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart"))
