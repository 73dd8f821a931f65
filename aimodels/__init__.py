"""aimodels: the reference implementations of the course "Large Models as a Service".

One small module per idea; a notebook imports what it teaches:

========== ==============================================================
module     holds
========== ==============================================================
scaling    parameter, memory, FLOP and time calculators (Chapter 1)
optim      gradient descent, SGD with momentum, RMSProp, Adam (Chapter 2)
mlp        activations, losses and back-propagation by hand (Chapter 3)
cnn        convolution and pooling from scratch, LeNet-5 (Chapter 4)
rnn        an RNN twin of nn.RNN, gradients through time, forecaster (Chapter 5)
data       offline datasets, generated series, MNIST and CIFAR-10 loaders
train      seeding, device choice, timers, the training loop
plot       the plotting helpers the chapters share
display    show the package's own source code in a notebook
exercises  ``check_*`` functions that grade an exercise with hints
========== ==============================================================
"""

__version__ = "0.1.0"
