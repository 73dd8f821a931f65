"""aimodels: the reference implementations of the course "Large Models as a Service".

One small module per idea; a notebook imports what it teaches:

========== ==============================================================
module     holds
========== ==============================================================
scaling    parameter, memory, FLOP and time calculators (Chapter 1)
optim      gradient descent, SGD with momentum, RMSProp, Adam (Chapter 2)
cnn        convolutional networks, LeNet-5 (Chapter 4)
data       offline datasets
train      seeding, device choice, timers
plot       the plotting helpers the chapters share
display    show the package's own source code in a notebook
exercises  ``check_*`` functions that grade an exercise with hints
========== ==============================================================
"""

__version__ = "0.1.0"
