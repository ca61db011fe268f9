#!/usr/bin/env python
"""What a user would otherwise write: the reference notebook's vector-mlp probe, in plain PyTorch,
for every seed of one pair of reference pickles (a whole process: imports, loading, training).

    python scripts/torch_probe_pickle.py TRAIN.pkl TEST.pkl --seeds 30
"""

import argparse
import pickle

import torch


def train_one(x_train, y_train, x_test, y_test, seed: int, test_every_epoch: bool = True) -> tuple[float, float]:
    """The reference's training function for one seed: Linear(d,128,no bias)-ReLU-Linear(128,2),
    AdamW lr 1e-4 wd 1e-3, batches of 128, 25 epochs, the test set scored after every epoch (as
    the reference does; only the last score is kept). Returns (last loss, test accuracy)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(x_train.shape[1], 128, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(128, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train),
                                               batch_size=128, shuffle=True)
    test_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_test, y_test),
                                              batch_size=128, shuffle=True)
    accuracy = 0.0
    for epoch in range(25):
        model.train()
        for xb, yb in train_loader:
            loss = criterion(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if test_every_epoch or epoch == 24:
            model.eval()
            correct = 0
            with torch.no_grad():
                for xb, yb in test_loader:
                    correct += (model(xb).argmax(dim=1) == yb).sum().item()
            accuracy = correct / len(y_test)
    return loss.item(), accuracy


def load(path):
    with open(path, "rb") as f:
        data = pickle.load(f)
    return torch.stack(data["activations"]).float(), torch.tensor(data["labels"], dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("train")
    parser.add_argument("test")
    parser.add_argument("--seeds", type=int, default=30)
    args = parser.parse_args()
    (x_train, y_train), (x_test, y_test) = load(args.train), load(args.test)
    accuracies = [train_one(x_train, y_train, x_test, y_test, seed)[1] for seed in range(args.seeds)]
    print(f"vector-mlp, {args.seeds} seeds: mean test accuracy {sum(accuracies) / len(accuracies):.4f}")


if __name__ == "__main__":
    main()
