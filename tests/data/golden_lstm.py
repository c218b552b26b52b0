#!/usr/bin/env python3
"""Reference numbers for the golden LSTM test (crates/train/tests/model.rs, `golden_lstm_steps`).

Written from the LSTM equations (PyTorch's gate order i, f, g, o), independently of candle:
    [i f g o] = W_ih x + b_ih + W_hh h + b_hh
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h' = sigmoid(o) * tanh(c')
    logits = W_head h' + b_head      (on the top layer's h')

Model: vocabulary of pitches 60..=64 plus '/', '_', 'r' (8 symbols, ids in that order),
embedding of width 3, two layers of hidden width 4. Tensor number t (in the order below) holds,
at flat row-major index i, float32(0.5 * sin(0.7 * (i + 1) + 1.3 * (t + 1))).
The token ids 2, 5, 0, 7 are fed from the zero state; after each step the logits are recorded,
and after the last step every layer's h and c.

Run: python3 tests/data/golden_lstm.py > tests/data/golden_lstm.json
"""
import json

import numpy as np

VOCAB, EMB, HIDDEN, LAYERS = 8, 3, 4, 2
TOKENS = [2, 5, 0, 7]


def shapes():
    out = [("embedding.weight", (VOCAB, EMB))]
    for k in range(LAYERS):
        width = EMB if k == 0 else HIDDEN
        out += [
            ("lstm.weight_ih_l%d" % k, (4 * HIDDEN, width)),
            ("lstm.weight_hh_l%d" % k, (4 * HIDDEN, HIDDEN)),
            ("lstm.bias_ih_l%d" % k, (4 * HIDDEN,)),
            ("lstm.bias_hh_l%d" % k, (4 * HIDDEN,)),
        ]
    return out + [("head.weight", (VOCAB, HIDDEN)), ("head.bias", (VOCAB,))]


def weights():
    w = {}
    for t, (name, shape) in enumerate(shapes()):
        n = int(np.prod(shape))
        i = np.arange(n, dtype=np.float64)
        values = (0.5 * np.sin(0.7 * (i + 1) + 1.3 * (t + 1))).astype(np.float32)
        w[name] = values.reshape(shape).astype(np.float64)
    return w


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def main():
    w = weights()
    h = [np.zeros(HIDDEN) for _ in range(LAYERS)]
    c = [np.zeros(HIDDEN) for _ in range(LAYERS)]
    logits = []
    for token in TOKENS:
        x = w["embedding.weight"][token]
        for k in range(LAYERS):
            gates = (w["lstm.weight_ih_l%d" % k] @ x + w["lstm.bias_ih_l%d" % k]
                     + w["lstm.weight_hh_l%d" % k] @ h[k] + w["lstm.bias_hh_l%d" % k])
            i, f, g, o = np.split(gates, 4)
            c[k] = sigmoid(f) * c[k] + sigmoid(i) * np.tanh(g)
            h[k] = sigmoid(o) * np.tanh(c[k])
            x = h[k]
        logits.append((w["head.weight"] @ x + w["head.bias"]).tolist())
    out = {
        "tokens": TOKENS,
        "logits": logits,
        "h": [v.tolist() for v in h],
        "c": [v.tolist() for v in c],
        "numpy": np.__version__,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
