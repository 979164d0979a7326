"""A seeded sparse Markov source whose entropy rate is known exactly.

Order-k chain over V symbols: each context (the last k symbols, one of V**k)
allows `branching` successors with Dirichlet(1) random probabilities (see
`_successors` for how the sets are drawn). The chain is redrawn
(deterministically) until the context graph is irreducible and aperiodic,
so its stationary distribution pi is unique; documents start from pi, which
makes every document a stationary sample. Then, exactly (up to
float rounding of one linear solve):

  entropy rate  h = sum_c pi(c) H(next | c)         nats per symbol
  H(pi)         entropy of the first k symbols of a document

Symbols are written as the ASCII characters `ALPHABET[:V]`, one byte each, so
with the byte tokenizer one symbol is one training token and `h` is the
per-token entropy of symbol targets; for any tokenizer h / ln 2 is the
bits-per-byte floor. BOS and EOS change the per-target average: a document of
n symbols has n + 1 targets (BOS->x1 ... xn->EOS) whose optimal mean nll is
(H(pi) + (n - k) h) / (n + 1), since x1..xk cost H(pi) and EOS is certain at a
known length. Packing cuts documents at row ends, where a fragment's first k
targets lack context, so achievable training loss is slightly above that.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import string

import numpy as np

from llmlab.data.documents import Documents
from llmlab.data.errors import DataError

ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits
MAX_CONTEXTS = 4096  # the stationary solve is a dense C x C system


@dataclasses.dataclass(frozen=True)
class MarkovChain:
  num_symbols: int          # V
  order: int                # k; context id = sum_j s_j V^(k-1-j), oldest first
  successors: np.ndarray    # int [C, b] allowed next symbols per context
  probs: np.ndarray         # float [C, b] their probabilities (rows sum to 1)

  @property
  def num_contexts(self) -> int:
    return self.num_symbols ** self.order

  def next_context(self, ctx, symbol):
    return (ctx * self.num_symbols + symbol) % self.num_contexts


def make_chain(seed: int, num_symbols: int, order: int, branching: int,
               attempts: int = 100) -> MarkovChain:
  """A random ergodic chain, a pure function of its arguments."""
  _check_shape(num_symbols, order, branching)
  rng = np.random.default_rng(seed)
  contexts = num_symbols ** order
  for _ in range(attempts):
    succ = _successors(rng, num_symbols, order, branching)
    probs = rng.dirichlet(np.ones(branching), size=contexts)
    chain = MarkovChain(num_symbols, order, succ, probs)
    if is_ergodic(chain):
      return chain
  raise DataError(f"data.synthetic: no irreducible aperiodic chain with "
                  f"num_symbols={num_symbols}, order={order}, "
                  f"branching={branching} in {attempts} tries; raise branching")


def _successors(rng, num_symbols: int, order: int, branching: int):
  """int [C, b]: random successor sets where every context has a predecessor.

  Purely random sparse sets almost never give an irreducible chain (some
  context is nobody's successor). So contexts sharing their newest k-1
  symbols r, which all lead into the contexts (r, x), get successor sets that
  include a random permutation of x over their oldest symbol; the rest of
  each set is random. Irreducibility is then likely and is still checked.
  """
  v = num_symbols
  contexts = v ** order
  oldest = np.arange(contexts) // v ** (order - 1)
  suffix = np.arange(contexts) % v ** (order - 1)
  perms = np.argsort(rng.random((v ** (order - 1), v)), axis=1)
  forced = perms[suffix, oldest]
  keys = rng.random((contexts, v))
  keys[np.arange(contexts), forced] = -1.0  # sorts first: always kept
  return np.argsort(keys, axis=1)[:, :branching]


def _check_shape(num_symbols: int, order: int, branching: int) -> None:
  if not 2 <= num_symbols <= len(ALPHABET):
    raise DataError(f"data.synthetic.num_symbols={num_symbols}: must be in "
                    f"[2, {len(ALPHABET)}]")
  if order < 1 or num_symbols ** order > MAX_CONTEXTS:
    raise DataError(f"data.synthetic.order={order}: need order >= 1 and "
                    f"num_symbols**order <= {MAX_CONTEXTS}")
  if not 1 <= branching <= num_symbols:
    raise DataError(f"data.synthetic.branching={branching}: must be in "
                    f"[1, num_symbols={num_symbols}]")


def _edges(chain: MarkovChain):
  """Context graph edges (from, to, probability) with probability > 0."""
  ctx = np.repeat(np.arange(chain.num_contexts), chain.successors.shape[1])
  to = chain.next_context(ctx, chain.successors.reshape(-1))
  prob = chain.probs.reshape(-1)
  keep = prob > 0
  return ctx[keep], to[keep], prob[keep]


def is_ergodic(chain: MarkovChain) -> bool:
  """Irreducible (one strongly connected class) and aperiodic (period 1)."""
  src, dst, _ = _edges(chain)
  levels = _bfs_levels(chain.num_contexts, src, dst)
  backward = _bfs_levels(chain.num_contexts, dst, src)
  if (levels < 0).any() or (backward < 0).any():
    return False
  # The period of an irreducible chain is the gcd of level(u) + 1 - level(v).
  return int(np.gcd.reduce(np.abs(levels[src] + 1 - levels[dst]))) == 1


def _bfs_levels(n: int, src, dst) -> np.ndarray:
  adjacency = collections.defaultdict(list)
  for u, v in zip(src.tolist(), dst.tolist()):
    adjacency[u].append(v)
  levels = np.full(n, -1)
  levels[0] = 0
  queue = collections.deque([0])
  while queue:
    u = queue.popleft()
    for v in adjacency[u]:
      if levels[v] < 0:
        levels[v] = levels[u] + 1
        queue.append(v)
  return levels


def stationary(chain: MarkovChain) -> np.ndarray:
  """pi [C] with pi P = pi, sum pi = 1 (one dense linear solve)."""
  n = chain.num_contexts
  transition = np.zeros((n, n))
  src, dst, prob = _edges(chain)
  np.add.at(transition, (src, dst), prob)
  system = transition.T - np.eye(n)
  system[-1] = 1.0
  rhs = np.zeros(n)
  rhs[-1] = 1.0
  pi = np.clip(np.linalg.solve(system, rhs), 0.0, None)  # rounding only
  return pi / pi.sum()


def _entropy(p: np.ndarray) -> np.ndarray:
  """-sum p ln p over the last axis, with 0 ln 0 = 0."""
  safe = np.where(p > 0, p, 1.0)
  return -(p * np.log(safe)).sum(axis=-1)


def entropy_rate(chain: MarkovChain, pi: np.ndarray | None = None) -> float:
  """h = sum_c pi(c) H(P(.|c)) in nats per symbol."""
  pi = stationary(chain) if pi is None else pi
  return float(pi @ _entropy(chain.probs))


def sample(chain: MarkovChain, num_docs: int, doc_len: int,
           rng: np.random.Generator, pi: np.ndarray | None = None
           ) -> np.ndarray:
  """int [num_docs, doc_len] symbols; each row a stationary sample."""
  k, v = chain.order, chain.num_symbols
  if doc_len <= k:
    raise DataError(f"data.synthetic.doc_len={doc_len}: must exceed "
                    f"order={k}")
  out = np.zeros((num_docs, doc_len), np.int64)
  pi = stationary(chain) if pi is None else pi
  ctx = rng.choice(chain.num_contexts, size=num_docs, p=pi)
  for j in range(k):
    out[:, j] = (ctx // v ** (k - 1 - j)) % v
  cdf = np.cumsum(chain.probs, axis=1)
  last = chain.successors.shape[1] - 1
  for t in range(k, doc_len):
    u = rng.random(num_docs)
    pick = np.minimum((u[:, None] > cdf[ctx]).sum(axis=1), last)
    out[:, t] = chain.successors[ctx, pick]
    ctx = chain.next_context(ctx, out[:, t])
  return out


def read(cfg) -> Documents:
  """The synthetic corpus of `data.synthetic`, with its exact entropies."""
  num_docs, doc_len = int(cfg.num_docs), int(cfg.doc_len)
  if num_docs < 2:
    raise DataError(f"data.synthetic.num_docs={num_docs}: need >= 2")
  chain = make_chain(int(cfg.seed), int(cfg.num_symbols), int(cfg.order),
                     int(cfg.branching))
  pi = stationary(chain)
  symbols = sample(chain, num_docs, doc_len,
                   np.random.default_rng([int(cfg.seed), 1]), pi)
  chars = np.array(list(ALPHABET[:chain.num_symbols]))
  texts = ["".join(row) for row in chars[symbols]]
  h = entropy_rate(chain, pi)
  h_start = float(_entropy(pi))
  params = {k: int(cfg[k]) for k in ("seed", "order", "num_symbols",
                                     "branching", "num_docs", "doc_len")}
  sha = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
  for text in texts:
    sha.update(text.encode("ascii") + b"\0")
  info = {"source": "synthetic", **params, "bytes": num_docs * doc_len,
          "entropy_rate_nats_per_symbol": h,
          "entropy_rate_bits_per_byte": h / math.log(2),
          "start_entropy_nats": h_start,
          "doc_entropy_nats_per_target":
              (h_start + (doc_len - chain.order) * h) / (doc_len + 1)}
  keys = [f"synthetic#{i}" for i in range(num_docs)]
  return Documents("synthetic", keys, texts, sha.hexdigest(), info)
