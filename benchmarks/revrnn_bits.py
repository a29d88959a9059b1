"""That a speed change to the reversible RNNs leaves their states and buffer decisions bit for bit as they were.

Runs RevLSTM and RevGRU stacks on fixed seeds (issue 25's 2 x 256, T = 35, batch 20 setting; forget_bits
None with large weights, so words spill often; masked sequences on 3 layers; a small RevGRU), each for two
training steps (the second after a sign-SGD update of the first's gradients). Per step it keeps the outputs,
the final states, every buffer's spill decisions, live word and spilled words after the forward, the states
after the backward's reversal, and the gradients. Save on two commits, then compare:

    python benchmarks/revrnn_bits.py --save before.pt     # on the old commit
    python benchmarks/revrnn_bits.py --save after.pt      # on the new one
    python benchmarks/revrnn_bits.py --compare before.pt after.pt

The comparison requires every state, output, word and spill decision to be equal (torch.equal) and prints
the largest relative difference of the gradients, which may change with the order of float sums.
"""

from __future__ import annotations

import argparse
import sys

import torch

from revbits.revrnn import RevGRU, RevLSTM

CASES = {  # name: (class, forget_bits, T, B, hidden, layers, weight scale, lengths)
    "lstm-2x256-k3": (RevLSTM, 3, 35, 20, 256, 2, 1.0, None),
    "lstm-2x64-none": (RevLSTM, None, 40, 6, 64, 2, 3.0, None),
    "lstm-3x32-k1-masked": (RevLSTM, 1, 12, 6, 32, 3, 1.0, [7, 3, 12, 12, 1, 9]),
    "lstm-2x16-k5": (RevLSTM, 5, 50, 4, 16, 2, 2.0, None),
    "gru-2x64-k3": (RevGRU, 3, 20, 8, 64, 2, 1.0, None),
}


def run_case(cls, forget_bits, steps, batch, hidden, layers, scale, lengths) -> list[dict]:
    torch.manual_seed(0)
    rnn = cls(hidden, hidden, num_layers=layers, forget_bits=forget_bits, batch_first=True)
    with torch.no_grad():
        for p in rnn.parameters():
            p.mul_(scale)
    x = torch.randn(batch, steps, hidden, requires_grad=True)
    probe = torch.randn(batch, steps, hidden)
    lengths = None if lengths is None else torch.tensor(lengths)
    records = []
    for _ in range(2):
        rnn.zero_grad(set_to_none=True)
        x.grad = None
        out, finals = rnn(x, lengths=lengths)
        run = rnn.last_run
        record = {
            "out": out.detach().clone(),
            "finals": [f.detach().clone() for f in (finals if isinstance(finals, tuple) else (finals,))],
            "spills": [[bool(s) for s in b._spilled] for b in run.buffers],
            "words": [b.word.clone() for b in run.buffers],
            "stacks": [[w.clone() for w in b._stack] for b in run.buffers],
        }
        (out * probe).sum().backward()
        record["reversed"] = [[s.clone() for s in state] for state in run.states]
        record["emptied"] = [b.empty for b in run.buffers]
        record["grads"] = [x.grad.clone()] + [p.grad.clone() for p in rnn.parameters()]
        records.append(record)
        with torch.no_grad():
            for p in rnn.parameters():
                p.sub_(0.05 * p.grad.sign())
    return records


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(equal(u, v) for u, v in zip(a, b))
    return a == b


def compare(before: dict, after: dict) -> bool:
    same = True
    for name, records in before.items():
        for step, (old, new) in enumerate(zip(records, after[name])):
            differ = [key for key in old if key != "grads" and not equal(old[key], new[key])]
            same &= not differ
            pairs = zip(old["grads"], new["grads"])
            grads = [float((a - b).abs().max()) / max(float(a.abs().max()), 1e-30) for a, b in pairs]
            spills = [sum(s) for s in old["spills"]]
            print(
                f"{name} step {step}: {'DIFFER: ' + ', '.join(differ) if differ else 'states, words, spills equal'}; "
                f"spills per layer {spills}; gradients max relative difference {max(grads):.2e}"
            )
    print("ALL EQUAL" if same else "NOT EQUAL")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save", help="run every case and save the records here (torch.save)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.save:
        torch.save({name: run_case(*case) for name, case in CASES.items()}, args.save)
    if args.compare:
        sys.exit(0 if compare(*(torch.load(path) for path in args.compare)) else 1)


if __name__ == "__main__":
    main()
