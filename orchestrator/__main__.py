from orchestrator.cli import main

if __name__ == "__main__":  # vLLM's engine starts processes with spawn, which re-imports this module
    main()
