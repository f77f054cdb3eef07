"""One rank of the 2-process test in test_hf.py (run by torchrun; not a test module itself).

Usage: torchrun --nproc_per_node N hf_ddp_worker.py DATA_DIR OUT_DIR PER_DEVICE GA STEPS [SPEC]
Trains the tests' tiny GPT-2 with Aioli (or SPEC, a JSON object with ``mixer``, ``options`` and
``config`` for ``MixlabCallback``) through the Trainer and writes, per rank,
OUT_DIR/rank<r>.json with the mixer's state, the history and the final weights' checksum;
checkpoints (every 4 steps) go to OUT_DIR/trainer.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import transformers

from mixlab.integrations.hf import MixlabCallback

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)


def main() -> None:
    data, out, micro, ga, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(config)
    spec = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {
        "mixer": "aioli", "options": {"round_steps": 4, "lp_rounds": 1, "lp_steps": 1}}
    cb = MixlabCallback(data, spec["mixer"], spec.get("options", {}), seq_len=16, eval_windows=4,
                        config=spec.get("config"))
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, "trainer"), max_steps=steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=ga, learning_rate=1e-2, use_cpu=True, report_to=[],
        save_strategy="steps", save_steps=4, logging_steps=1, disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=cb.train_dataset,
                                   compute_loss_func=cb.compute_loss, callbacks=[cb])
    trainer.train()
    rank = args.process_index
    record = {
        "world": args.world_size,
        "mixer": cb.mixer.state_dict(),
        "losses": [h.loss for h in cb.history],
        "drawn": [h.drawn.tolist() for h in cb.history],
        "weights": [h.weights.tolist() for h in cb.history],
        "params": float(sum(p.detach().double().sum() for p in model.parameters())),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    # Skip interpreter teardown: a gloo process group still alive at exit can abort the
    # process ("terminate called without an active exception", exit -6, seen once in CI), and
    # tearing it down by hand can hang when the ranks reach it apart. Everything the test reads
    # is written and closed above.
    os._exit(0)


if __name__ == "__main__":
    main()
