"""Train a small MLP on scikit-learn's bundled digits with a loss written as text.

    pip install "lossdsl[torch]" scikit-learn
    python examples/train_digits.py

The loss is Poly-1 (Leng et al., 2022, "PolyLoss"): cross-entropy plus ε·(1 - p_t), the first
polynomial term of its Taylor expansion given its own weight. lossdsl compiles it into one fused
value-and-gradient kernel; lossdsl.torch makes that kernel a torch autograd function.
"""
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lossdsl
import lossdsl.torch as lt

POLY1 = """
loss poly1 "Poly-1: cross-entropy plus eps * (1 - p_t) (Leng et al., 2022)"
  input  z[K]
  target y : class(K)
  param  eps = 1 : real
  p_t  = exp(z[y] - logsumexp[k] z[k])
  loss = cross_entropy(z, y) + eps * (1 - p_t)
"""


def main(epochs=30, batch=64, seed=0):
    torch.manual_seed(seed)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed)
    x_train, x_test = (torch.tensor(a, dtype=torch.float32) for a in (x_train, x_test))
    y_train, y_test = (torch.tensor(a) for a in (y_train, y_test))

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    criterion = lt.LossModule(lossdsl.compile(POLY1)["poly1"], eps=2.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x_train))
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss = criterion(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch:2d}  loss {total / len(x_train):.4f}  test accuracy {acc:.3f}")
    print(f"final test accuracy {acc:.3f} in {time.perf_counter() - start:.1f} s")
    return acc


if __name__ == "__main__":
    main()
