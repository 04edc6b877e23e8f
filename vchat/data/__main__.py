"""`python -m vchat.data DIR [--num-samples N] [--seed S] [--image-size PX]`: write the built-in
synthetic dataset (and its tokenizer.json) under DIR/synthetic/."""

from vchat.data.synthetic import main

main()
