import sys

from experiments.tailedcore.main import main

if __name__ == "__main__":
    main(sys.argv[1:])
