"""One tensor-parallel run, as a user would write it, for tests/test_tensor_parallel.py:

    torchrun --nproc-per-node N tests/tp_worker.py MODEL OUT.json [--backend B] [--steps 32]
        [--path-rank1 OTHER_MODEL] [--die-rank R --die-at-step K]

Rank 0 writes OUT.json: logits of PROMPTS[0] + PROMPTS[2] (full forward), greedy tokens for one
prompt and for the padded batch PROMPTS (step plans), and for the one prompt again on the op path. --die-rank makes that rank kill itself (SIGKILL) at its
K-th decoder step (a rank dying mid-generation); --path-rank1 gives rank 1 another model file.
"""
import argparse
import json
import os
import signal
import sys

import torch

import portinfer

from hf_models import PROMPTS  # the tests' prompts (this script's folder is on sys.path: it runs as a script)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--path-rank1")
    p.add_argument("--die-rank", type=int)
    p.add_argument("--die-at-step", type=int, default=3)
    p.add_argument("--prompts", help="JSON list of token-id lists (default: PROMPTS)")
    args = p.parse_args()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    prompts = json.loads(args.prompts) if args.prompts else PROMPTS
    if args.die_rank == rank:
        from portinfer.runtime import model as model_module

        forward, calls = model_module.Decoder.forward, [0]

        def dying_forward(self, *a, **k):
            calls[0] += 1
            if calls[0] == args.die_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(self, *a, **k)

        model_module.Decoder.forward = dying_forward
    path = args.path_rank1 if args.path_rank1 and rank == 1 else args.model
    model = portinfer.load(path, backend=args.backend, dtype="fp32", tensor_parallel=world)
    # only rank 0 gets here: the others serve its steps inside load() and exit
    ids = torch.tensor([prompts[0] + prompts[-1]])
    out = {"logits": model.logits(ids)[0].tolist()}
    out["single"] = model.generate(prompts[0], max_new_tokens=args.steps, eos_token_id=[]).token_ids
    out["batch"] = [g.token_ids for g in model.generate(prompts, max_new_tokens=args.steps, eos_token_id=[])]
    model.plans = False  # the op path (the steps above ran as plans): the followers get the flag with each step
    out["single_op_path"] = model.generate(prompts[0], max_new_tokens=args.steps, eos_token_id=[]).token_ids
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    sys.exit(main())
