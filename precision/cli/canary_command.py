"""``precision-check canary``: a served model's prompt log-probabilities against a golden store (precision.canary).

Exit codes as ``regress``: 0 no real top-1 flip, 1 at least one (each named by prompt and position), 2 a bad store,
URL, or a server that is down or is not vLLM."""

from __future__ import annotations

from precision.cli.parser import EXIT_FAILED, EXIT_OK


def add_command(subparsers) -> None:
    p = subparsers.add_parser("canary", help="check a served model (vLLM's OpenAI server) against a golden store, without instrumenting it")
    p.add_argument("--url", required=True, help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--golden", required=True, metavar="STORE", help="a golden store made by 'precision-check golden create' for the served model")
    p.add_argument("--model", help="the served model name to ask for (default: the server's only model)")
    p.add_argument("--top-k", type=int, default=20, help="prompt_logprobs per position (default: 20, vLLM's default --max-logprobs)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each request (default: 120)")
    p.set_defaults(handler=handle)


def handle(args) -> int:
    from precision import run_canary

    results = run_canary(args.url, args.golden, model=args.model, top_k=args.top_k, timeout=args.timeout)
    positions = sum(r.positions for r in results)
    flips = [(r, f) for r in results for f in r.flips]
    real = [(r, f) for r in results for f in r.real_flips]
    for result in results:
        print(f"  {result.id} ({result.category}): {result.positions} positions, {len(result.flips)} top-1 flip(s), "
              f"{len(result.real_flips)} real; largest |logprob error| of the forced tokens {result.max_forced_logprob_error:.3e} nats")
    for result, flip in real:
        print(f"FAIL {result.id} position {flip['position']}: the server ranks token {flip['actual_token']} first, the reference "
              f"token {flip['expected_token']}, which the reference prefers by {flip['margin']:.4g} nats, beyond the near-tie bound {flip['bound']:.4g} "
              f"(rounding {flip['rounding_allowance']:.3g} + z {flip['z']:.2f} x sqrt(2) x envelope sigma {flip['envelope_sigma']:.3g})")
    worst = max((f["margin"] / f["bound"] for _, f in flips if f["bound"] > 0), default=0.0)
    status = "FAIL" if real else "PASS"
    print(f"canary: {status}: {len(results)} prompts, {positions} positions, {len(flips)} top-1 flip(s), {len(real)} real "
          f"(largest margin/bound {worst:.2f}) against {args.url}")
    return EXIT_FAILED if real else EXIT_OK
