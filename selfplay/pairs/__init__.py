"""A round's pairs, pure logic over tables: candidate pairs built and screened (`build`), the knockout bracket
(`knockout`), and the filter's selection of the pairs that train (`selection`)."""
