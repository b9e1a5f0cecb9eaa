"""Build the zoo of small trained MoE and dense models: python scripts/build_zoo.py --size tiny --arch all."""

import sys

from moeshare.zoo import main

if __name__ == "__main__":
    sys.exit(main())
