"""Train a small MLP with Ranger on scikit-learn's bundled digits data and print test accuracy."""

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from rangerdl import Ranger

torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(
    x / 16.0, y, test_size=0.25, stratify=y, random_state=0
)
x_train, x_test = (torch.tensor(a, dtype=torch.float32) for a in (x_train, x_test))
y_train, y_test = (torch.tensor(a) for a in (y_train, y_test))

model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
optimizer = Ranger(model.parameters(), lr=3e-3)
for _epoch in range(30):
    for idx in torch.randperm(len(x_train)).split(64):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        optimizer.step()
accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"digits test accuracy with Ranger: {accuracy:.4f}")
