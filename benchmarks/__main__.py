import sys

try:
    from .cli import main
except ModuleNotFoundError as e:  # the benchmarks' own dependencies come with the bench extra
    if e.name is None or e.name.split(".")[0] in ("benchmarks", "semtoken_rag"):
        raise
    print(f"[bench] error: the benchmarks need {e.name}: pip install -e '.[bench]' (from the clone's root)",
          file=sys.stderr)
    sys.exit(2)

sys.exit(main())
