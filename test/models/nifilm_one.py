"""The nickel film of nifilm.py fitted to one data file, the one named by the
model's first argument (``refl1d nifilm_one.py nifilm-tof-2.dat``): one
member of a fit series. It prints the file it loads, so that a test can see
which file each member's model was given."""

import sys

from refl1d.names import SNS, Material, silicon, air, Experiment, FitProblem

dataFile = sys.argv[1]
print("model data: %s" % (dataFile,))
probe = SNS.Liquids().load(dataFile)

nickel = Material("Ni")
sample = silicon(0, 5) | nickel(125, 10) | air

sample[1].thickness.pm(50)
sample[0].interface.range(3, 12)
sample[1].interface.range(0, 20)

experiment = Experiment(probe=probe, sample=sample)
problem = FitProblem(experiment)
