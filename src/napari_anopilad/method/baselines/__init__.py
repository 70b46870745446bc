"""The comparison methods of the AnoPILaD paper as scorers with the same interface as AnoPILaD's."""
