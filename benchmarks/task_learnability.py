"""Does a model learn an algorithmic task in distribution, and after how many steps?

A fast search tool, not the benchmark of record: a plain PyTorch loop (AdamW, warm-up + cosine,
clipping 1.0) on bifocal's GPT with a word-level vocabulary (every space-separated symbol is one
token), random windows of the packed training documents (training-side instances only), and greedy
exact match every --every steps on 200 held-out examples of the training distribution, with accuracy
per length, and on 200 training-side ones (the recall control). The settings
it finds are then run for real with `bifocal study tasks` (DeepSpeed, BPE, the task configs).

    python benchmarks/task_learnability.py --task modular --params '{"p": 5, "min_len": 1, "max_len": 4}' \
        --lr 1e-2 --steps 1500 --every 250 --seed 1
"""
import argparse, json, math, random, sys, time
import torch
from bifocal.data_pipeline.synthetic import generate_documents, generate_examples, check_answer
from bifocal.model.config import GPTConfig
from bifocal.model.gpt import GPT

ap = argparse.ArgumentParser()
ap.add_argument("--task", default="modular")
ap.add_argument("--params", default="{}")
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--d", type=int, default=64)
ap.add_argument("--heads", type=int, default=4)
ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--wd", type=float, default=0.1)
ap.add_argument("--steps", type=int, default=1500)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--T", type=int, default=64)
ap.add_argument("--scheme", default="rope")
ap.add_argument("--every", type=int, default=100)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
params = json.loads(a.params)
docs = list(generate_documents(a.task, 3000, 0, **params))
words = sorted({w for d in docs for line in d.split("\n") for w in line.split()} | {"\n"})
extra = [str(i) for i in range(30)] + list("abcdefghijklmnopqrstuvwxyz()[]{}")
words = sorted(set(words) | set(extra))
idx = {w: i for i, w in enumerate(words)}
def enc(text):
    out = []
    for line in text.split("\n"):
        if line:
            out += [idx[w] for w in line.split()] + [idx["\n"]]
    return out
stream = torch.tensor([t for d in docs for t in enc(d)])
cfg = GPTConfig(vocab_size=len(words), n_layer=a.layers, n_head=a.heads, d_model=a.d, max_seq_len=a.T,
                position={"scheme": a.scheme})
model = GPT(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd, betas=(0.9, 0.95))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps))))
test = generate_examples(a.task, 200, 1, side="test", **params)
seen = generate_examples(a.task, 200, 1, side="train", **params)
def accuracy(test=test):
    model.eval(); ok = 0; bylen = {}
    with torch.no_grad():
        for ex in test:
            ids = enc(ex.prompt + "\n")[:-1]
            ans = []
            n_ans = len(ex.answer.split())
            for _ in range(n_ans + 1):
                logits, _ = model(torch.tensor([ids]))
                t = int(logits[0, -1].argmax())
                if words[t] == "\n":
                    break
                ans.append(words[t]); ids.append(t)
            good = check_answer(a.task, ex.prompt, " " + " ".join(ans))
            ok += good
            L = ex.meta["length"]; c = bylen.setdefault(L, [0, 0]); c[0] += good; c[1] += 1
    model.train()
    global last_bylen
    last_bylen = " ".join(f"{k}:{v[0]/v[1]:.2f}" for k, v in sorted(bylen.items()))
    return ok / len(test)
g = torch.Generator().manual_seed(0)
t0 = time.time()
for step in range(1, a.steps + 1):
    starts = torch.randint(0, len(stream) - a.T - 1, (a.batch,), generator=g)
    x = torch.stack([stream[s:s + a.T] for s in starts]); y = torch.stack([stream[s + 1:s + a.T + 1] for s in starts])
    _, loss = model(x, y, return_logits=False)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
    if step % a.every == 0:
        recall = accuracy(seen)
        print(f"step {step} loss {loss.item():.4f} acc {accuracy():.3f} [{last_bylen}] train-side {recall:.3f} "
              f"t {time.time()-t0:.0f}s", flush=True)
