"""The recipe's training step in Keras/TensorFlow, timed batch by batch for `cargo xtask bench`.

The model of ../shared/reference/keras-recipe/train.py: Input(None, vocab) -> LSTM(hidden) ->
Dropout(0.2) -> Dense(vocab, softmax), sparse categorical cross-entropy, Adam(1e-3). With
--every-position the LSTM returns every step and the Dense layer predicts every position (our
training's targets); otherwise only each window's last symbol is a target, as in the recipe.
--layers stacks more LSTMs and --embedding reads tokens through an Embedding of that width
instead of one-hot vectors (the built-in model's sizes: --layers 2 --embedding 64).
Inputs are random windows of the given sizes (speed does not depend on the values).

Protocol: prints "ready", its version and the device it trains on (GPU or CPU) once built and
traced; then for each line "N" read from stdin runs N training batches and prints one line with
the milliseconds of each; exits at end of input.
"""
import argparse
import sys
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=44)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--embedding", type=int, default=0)
    ap.add_argument("--every-position", action="store_true")
    args = ap.parse_args()

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(1)
    if args.embedding:
        inp = keras.layers.Input(shape=(None,), dtype="int32")
        x = keras.layers.Embedding(args.vocab, args.embedding)(inp)
    else:
        inp = keras.layers.Input(shape=(None, args.vocab))
        x = inp
    for layer in range(args.layers):
        last = layer == args.layers - 1
        x = keras.layers.LSTM(args.hidden, return_sequences=args.every_position or not last)(x)
    x = keras.layers.Dropout(0.2)(x)
    out = keras.layers.Dense(args.vocab, activation="softmax")(x)
    model = keras.Model(inp, out)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.Adam(learning_rate=0.001))

    rng = np.random.default_rng(1)

    def batch():
        ids = rng.integers(0, args.vocab, size=(args.batch, args.window + 1))
        if args.embedding:
            xs = ids[:, :-1].astype(np.int32)
        else:
            xs = tf.one_hot(ids[:, :-1], args.vocab, dtype=tf.float32)
        ys = ids[:, 1:] if args.every_position else ids[:, -1]
        return xs, ys

    for _ in range(3):
        model.train_on_batch(*batch())
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print("ready", tf.__version__, device, flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line.strip() or "1")):
            xs, ys = batch()
            t0 = time.perf_counter()
            model.train_on_batch(xs, ys)
            times.append((time.perf_counter() - t0) * 1000.0)
        print(" ".join("%.3f" % t for t in times), flush=True)


if __name__ == "__main__":
    main()
