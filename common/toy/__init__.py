"""The toy world: coloured shapes on 32x32 images, GenEval-shaped prompts, a programmatic
reward, and a small flow model we pretrain ourselves (`python -m common.toy.pretrain`)."""
