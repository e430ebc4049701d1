"""A nickel film on silicon: the model of `make demo`.

Fits the thickness and both interfaces of the film to ``nifilm-demo.refl``, a
neutron reflectivity curve that the demo simulates with refl1d (4 columns: Q,
R, dR, dQ).
"""

from refl1d.names import SLD, Experiment, FitProblem, load4

probe = load4("nifilm-demo.refl")
silicon, nickel, air = SLD("Si", rho=2.07), SLD("Ni", rho=9.41), SLD("air", rho=0.0)
sample = silicon(0, 5) | nickel(125, 10) | air

sample[1].thickness.range(50, 200)
sample[0].interface.range(1, 12)
sample[1].interface.range(0, 20)

problem = FitProblem(Experiment(probe=probe, sample=sample))
