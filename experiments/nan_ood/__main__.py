import sys

from experiments.nan_ood.main import main

if __name__ == "__main__":
    main(sys.argv[1:])
