from .cli import main

if __name__ == "__main__":  # not when an engine process imports this module
    raise SystemExit(main())
