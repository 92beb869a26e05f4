"""The gmm world (`--model gmm`): a conditional Gaussian mixture on a ring, the CartPole of this
library. Low-dimensional, so every algorithm is seen to learn in a minute; known, so the optimum
of every reward and the base's own distance to the truth are computed, not guessed."""
