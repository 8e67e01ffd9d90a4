"""Train a small MLP with Ranger on scikit-learn's bundled digits data and print test accuracy.

Ranger wants no warmup (RAdam's rectification is one) and a flat-then-anneal schedule; it is
evaluated on its Lookahead slow weights, swapped into the model by ``use_slow_weights``.
"""

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from rangerdl import Ranger
from rangerdl.optim import use_slow_weights
from rangerdl.optim.schedules import make_schedule

torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(
    x / 16.0, y, test_size=0.25, stratify=y, random_state=0
)
x_train, x_test = (torch.tensor(a, dtype=torch.float32) for a in (x_train, x_test))
y_train, y_test = (torch.tensor(a) for a in (y_train, y_test))

model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
epochs, batch_size = 40, 64
steps = epochs * (len(x_train) // batch_size)
optimizer = Ranger(model.parameters(), lr=3e-3)
schedule = make_schedule(optimizer, "flat_anneal", steps)
for _epoch in range(epochs):
    for idx in torch.randperm(len(x_train)).split(batch_size, 0):
        if len(idx) < batch_size:
            continue  # drop the last partial batch: the schedule counts full batches
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        optimizer.step()
        schedule.step()
with use_slow_weights(optimizer), torch.no_grad():  # the slow weights are the model to keep
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"digits test accuracy with Ranger (slow weights): {accuracy:.4f}")
