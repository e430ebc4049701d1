"""A 100 Å nickel film on silicon, four angles of a time-of-flight instrument.

The refl1d model script the fit tests run (data: nifilm-tof-1..4.dat from
shared/data/refl1d-examples, copied beside this file into the job directory).
The data files are opened by name: bumps loads a script with its own directory
as the working directory.
"""

from refl1d.names import SNS, Material, silicon, air, Experiment, FitProblem
from refl1d.probe import ProbeSet

instrument = SNS.Liquids()
files = ["nifilm-tof-%d.dat" % i for i in (1, 2, 3, 4)]
probe = ProbeSet([instrument.load(f) for f in files])

nickel = Material("Ni")
sample = silicon(0, 5) | nickel(125, 10) | air

sample[1].thickness.pm(50)
sample[0].interface.range(3, 12)
sample[1].interface.range(0, 20)

experiment = Experiment(probe=probe, sample=sample)
problem = FitProblem(experiment)
