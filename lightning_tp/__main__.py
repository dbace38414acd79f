from lightning_tp.cli import main

if __name__ == "__main__":
    main()
